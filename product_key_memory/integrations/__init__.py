"""Put PKM layers into models from other libraries (optional dependencies, imported on use).

* :mod:`product_key_memory.integrations.hf`: Hugging Face ``transformers`` models
  (``pip install transformers``, or the ``hf`` extra).
"""
