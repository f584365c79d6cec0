"""The torch-free code the API and the workers share: settings, the wire protocol, liveness, Redis
connections and errors, the job spec, the webhook contract, tracing. It imports nothing else of ours."""
