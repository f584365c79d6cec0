"""The torch-free core both sides import: settings, the wire protocol, liveness, Redis errors, the job spec."""
