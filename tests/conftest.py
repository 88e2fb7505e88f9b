import os

os.environ.setdefault("TORCHDYNAMO_DISABLE", "1")
