from unnoise.pipeline import Pipeline as Pipeline
