"""Model families (SD1.x, SD2.x, SDXL): recognising them, their shipped configs, loading, prompt encoding.

families.py knows how the families differ; loading.py builds a `BaseModel` from a single file, a diffusers folder
or a hub id; single_file.py, original_configs.py and from_original.py read the original single-file layout.
"""
