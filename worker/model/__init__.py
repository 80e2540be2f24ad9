"""The model: ``load`` (device, dtype, attention, the only transformers import), ``quantize``
(what stays unquantized per architecture), ``memory`` (weight and process memory, recycling)
and ``check`` (the ``--check`` smoke generation)."""
