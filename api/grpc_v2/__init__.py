"""The Open Inference Protocol's gRPC service (`grpc_predict_v2.proto`) and its generated modules.

The modules are generated from the .proto and committed, so an install needs only grpcio and
protobuf at run time (the API image has no compiler); tests/test_inference_grpc.py fails when they
drift from it. After changing the .proto, from the repository root:

    python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. api/grpc_v2/grpc_predict_v2.proto
"""
