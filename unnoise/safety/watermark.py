"""Invisible watermark: a 32-bit payload with a CRC-16, by QIM in DWT-DCT coefficients of the luminance.

The image's luminance is resampled to a fixed ``CANONICAL`` x ``CANONICAL`` grid; a two-level Haar DWT gives the
LL2 band (64 x 64), cut into 4x4 blocks whose DCT coefficients ``COEFFS`` each carry one bit by quantization index
modulation (Chen & Wornell 2001) with step ``DELTA`` and a keyed dither. The 48-bit codeword (payload + CRC) is
repeated over the 768 slots in a keyed order and read back by soft majority vote, so isolated bit errors are
corrected and the CRC tells a watermark from chance. The change is made on the canonical grid, resized to the image
and added to every channel equally (luminance only, colour kept), then corrected a few times against what the
detector reads from the rounded 8-bit result. Detection resamples any image to the canonical grid, which is what
makes the mark survive resizing; it does not survive cropping, rotation or strong filtering.

Images with a side under ``MIN_SIDE`` get no watermark (``WatermarkTooSmall``): 32x32 images from the default model
have too few pixels for a mark that survives JPEG or resizing, and none is ever claimed for them.
"""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image

CANONICAL = 256
MIN_SIDE = 256
BLOCK = 4
COEFFS = ((0, 1), (1, 0), (1, 1))  # low AC frequencies of each 4x4 DCT block: robust, little visible change
DELTA = 32.0  # QIM step in coefficient units (a coefficient change d moves canonical pixels by about d / 16)
PAYLOAD_BITS = 32
CRC_BITS = 16
DEFAULT_KEY = 0x756E6E6F  # "unno"; a private key makes the mark unreadable (and unforgeable) to others
DEFAULT_PAYLOAD = 0x554E4E31  # "UNN1": made by unnoise
REFINE_STEPS = 4
DETECT_AGREEMENT = 0.7  # unmarked images give about 0.6 (16 votes per bit), marked ones close to 1
_LUMA = np.array([0.299, 0.587, 0.114])  # ITU-R BT.601, as PIL's "L" conversion


class WatermarkTooSmall(ValueError):
    """The image is too small to carry a watermark that survives JPEG and resizing; none was embedded."""


@dataclasses.dataclass(frozen=True)
class Detection:
    """What ``detect`` read: the payload, whether its CRC holds, and the share of the 768 slots that agree with it."""

    payload: int
    crc_ok: bool
    agreement: float
    size: tuple[int, int]

    @property
    def detected(self) -> bool:
        """A watermark is present: the CRC matches and the slots agree well above chance."""
        return self.crc_ok and self.agreement >= DETECT_AGREEMENT

    def describe(self) -> str:
        text = _ascii(self.payload)
        if self.detected:
            return f"watermark found: payload 0x{self.payload:08x}{text}, confidence {self.agreement:.3f}, CRC ok"
        crc = "CRC ok" if self.crc_ok else "CRC fails"
        small = min(self.size) < MIN_SIDE // 2
        note = f"; at {self.size[0]}x{self.size[1]} it is too small to have been marked" if small else ""
        return f"no watermark found (confidence {self.agreement:.3f}, {crc}; unmarked images give about 0.6){note}"


def embed(image: Image.Image, payload: int = DEFAULT_PAYLOAD, *, key: int = DEFAULT_KEY) -> Image.Image:
    """A copy of ``image`` ("L", "RGB" or "RGBA") carrying ``payload``; ``WatermarkTooSmall`` under ``MIN_SIDE``."""
    if not 0 <= payload < 2**PAYLOAD_BITS:
        raise ValueError(f"payload={payload!r} is not allowed; expected an integer in [0, 2**{PAYLOAD_BITS})")
    width, height = image.size
    if min(width, height) < MIN_SIDE:
        raise WatermarkTooSmall(
            f"image is {width}x{height}; an invisible watermark needs at least {MIN_SIDE} pixels on each side to "
            "survive JPEG and resizing, so none was embedded"
        )
    mode = image.mode
    pixels = np.asarray(image.convert("L" if mode == "L" else "RGB"), dtype=np.float64)
    target_bits = _slot_bits(payload, key)
    dither = _dither(key)
    marked = pixels
    for _ in range(REFINE_STEPS):
        coeffs = _coefficients(_canonical(_luminance(marked)))
        delta = _qim(coeffs, target_bits, dither) - coeffs
        residual = _resize(_residual(delta), (height, width))
        marked = np.clip(np.round(marked + (residual if mode == "L" else residual[..., None])), 0, 255)
    out = Image.fromarray(marked.astype(np.uint8), "L" if mode == "L" else "RGB")
    if mode == "RGBA":
        out.putalpha(image.getchannel("A"))
    elif mode not in ("L", "RGB"):
        out = out.convert(mode)
    out.info.update(image.info)
    return out


def detect(image: Image.Image, *, key: int = DEFAULT_KEY) -> Detection:
    """Read the watermark of ``image`` (any size and mode; resampled to the canonical grid)."""
    pixels = np.asarray(image.convert("RGB"), dtype=np.float64)
    coeffs = _coefficients(_canonical(_luminance(pixels)))
    soft = _soft(coeffs, _dither(key))  # +1: bit 0, -1: bit 1, per slot
    order = _order(key)
    codeword_length = PAYLOAD_BITS + CRC_BITS
    votes = np.zeros(codeword_length)
    np.add.at(votes, order % codeword_length, soft)
    bits = (votes < 0).astype(np.uint8)
    agreement = float(np.mean((soft < 0) == bits[order % codeword_length].astype(bool)))
    payload = _to_int(bits[:PAYLOAD_BITS])
    crc_ok = _to_int(bits[PAYLOAD_BITS:]) == _crc16(payload)
    return Detection(payload, crc_ok, agreement, image.size)


def bit_accuracy(image: Image.Image, payload: int, *, key: int = DEFAULT_KEY) -> tuple[float, float]:
    """(share of the 48 codeword bits read right, share of the 768 raw slots read right) for a known payload."""
    coeffs = _coefficients(_canonical(_luminance(np.asarray(image.convert("RGB"), dtype=np.float64))))
    raw = (_soft(coeffs, _dither(key)) < 0).astype(np.uint8)
    expected = _slot_bits(payload, key)
    detection = detect(image, key=key)
    codeword = _codeword(detection.payload)
    return float(np.mean(codeword == _codeword(payload))), float(np.mean(raw == expected))


# -- transforms -----------------------------------------------------------------------------------------------------


def _luminance(pixels: np.ndarray) -> np.ndarray:
    return pixels if pixels.ndim == 2 else pixels[..., :3] @ _LUMA


def _resize(array: np.ndarray, size: tuple[int, int]) -> np.ndarray:
    """Bilinear resampling with antialiasing (both ways the same filter, so detection undoes embedding's scale)."""
    if array.shape == size:
        return array
    x = torch.from_numpy(array)[None, None]
    return F.interpolate(x, size=size, mode="bilinear", antialias=True, align_corners=False)[0, 0].numpy()


def _canonical(luminance: np.ndarray) -> np.ndarray:
    return _resize(luminance, (CANONICAL, CANONICAL))


def _dct_matrix(n: int = BLOCK) -> np.ndarray:
    """Orthonormal DCT-II matrix: row k is basis k."""
    k, i = np.arange(n)[:, None], np.arange(n)[None, :]
    m = np.cos(np.pi * (2 * i + 1) * k / (2 * n)) * np.sqrt(2 / n)
    m[0] /= np.sqrt(2)
    return m


def _blocks(ll: np.ndarray) -> np.ndarray:
    """(64, 64) -> (16, 16, 4, 4) blocks."""
    n = ll.shape[0] // BLOCK
    return ll.reshape(n, BLOCK, n, BLOCK).transpose(0, 2, 1, 3)


def _coefficients(canonical: np.ndarray) -> np.ndarray:
    """The carrying DCT coefficients of the LL2 blocks, ``(slots,)`` in block-major order."""
    # Two levels of orthonormal Haar: LL = (a + b + c + d) / 2 per 2x2, twice = 4 x the mean of each 4x4 patch.
    n = CANONICAL // 4
    ll2 = canonical.reshape(n, 4, n, 4).mean(axis=(1, 3)) * 4
    d = _dct_matrix()
    dct = d @ _blocks(ll2) @ d.T
    return np.stack([dct[..., u, v] for u, v in COEFFS], axis=-1).reshape(-1)


def _residual(delta: np.ndarray) -> np.ndarray:
    """Canonical-grid pixels for a change ``delta`` of the carrying coefficients (the transforms are orthonormal)."""
    n = CANONICAL // (4 * BLOCK)
    dct = np.zeros((n, n, BLOCK, BLOCK))
    per_block = delta.reshape(n, n, len(COEFFS))
    for j, (u, v) in enumerate(COEFFS):
        dct[..., u, v] = per_block[..., j]
    d = _dct_matrix()
    ll2 = (d.T @ dct @ d).transpose(0, 2, 1, 3).reshape(n * BLOCK, n * BLOCK)
    return np.kron(ll2 / 4, np.ones((4, 4)))  # inverse Haar with zero detail bands: each pixel gets LL2 / 4


# -- coding -----------------------------------------------------------------------------------------------------------


def _slots() -> int:
    return (CANONICAL // (4 * BLOCK)) ** 2 * len(COEFFS)


def _order(key: int) -> np.ndarray:
    """Slot -> codeword bit index (before ``% length``): a keyed shuffle so that repeats are spread over the image."""
    return np.random.default_rng([key, 1]).permutation(_slots())


def _dither(key: int) -> np.ndarray:
    return np.random.default_rng([key, 2]).uniform(0, DELTA, _slots())


def _codeword(payload: int) -> np.ndarray:
    return np.concatenate([_bits(payload, PAYLOAD_BITS), _bits(_crc16(payload), CRC_BITS)])


def _slot_bits(payload: int, key: int) -> np.ndarray:
    codeword = _codeword(payload)
    return codeword[_order(key) % len(codeword)]


def _qim(coeffs: np.ndarray, bits: np.ndarray, dither: np.ndarray) -> np.ndarray:
    """Nearest point of the lattice ``dither + (bit / 2 + Z) * DELTA``."""
    offset = dither + bits * DELTA / 2
    return np.round((coeffs - offset) / DELTA) * DELTA + offset


def _soft(coeffs: np.ndarray, dither: np.ndarray) -> np.ndarray:
    """Per slot in [-1, 1]: +1 on the bit-0 lattice, -1 on the bit-1 lattice, 0 half way."""
    r = np.mod((coeffs - dither) / DELTA, 1.0)
    distance0 = np.minimum(r, 1 - r)
    distance1 = np.abs(r - 0.5)
    return (distance1 - distance0) * 4


def _bits(value: int, n: int) -> np.ndarray:
    return np.array([(value >> (n - 1 - i)) & 1 for i in range(n)], dtype=np.uint8)


def _to_int(bits: np.ndarray) -> int:
    return int("".join(str(int(b)) for b in bits), 2)


def _crc16(value: int) -> int:
    """CRC-16/CCITT-FALSE of the payload's four big-endian bytes."""
    crc = 0xFFFF
    for byte in value.to_bytes(PAYLOAD_BITS // 8, "big"):
        crc ^= byte << 8
        for _ in range(8):
            crc = ((crc << 1) ^ 0x1021) if crc & 0x8000 else crc << 1
            crc &= 0xFFFF
    return crc


def _ascii(payload: int) -> str:
    raw = payload.to_bytes(PAYLOAD_BITS // 8, "big")
    return f" ({raw.decode()!r})" if all(32 <= b < 127 for b in raw) else ""
