"""Generation: the rollout engines (:mod:`.hf`), what they return (:mod:`.batch`), sampling (:mod:`.sampling`),
prompt prefix sharing (:mod:`.prefix`) and the log-prob forwards (:mod:`.logprobs`)."""
