"""Raw data sets → unified samples (see `schema.py` for the format other parts rely on).

- `schema.py`   the sample format, drop reasons, `validate_sample`
- `aic.py`      AI Challenger captions converter
- `llava.py`    LLaVA conversations converter
- `images.py`   decode every referenced image once, in worker processes
- `pipeline.py` config → converters → image check → train / val split → atomic outputs
- `report.py`   kept / dropped per source and reason, as JSON and text
"""
