"""Models: loading policies and tokenizers (:mod:`.loading`), the embedded pretrained weights (:mod:`.embedded`),
tiny random models (:mod:`.tiny`), the principle encoder (:mod:`.encoder`) and the one door to transformers
internals (:mod:`.compat`)."""
