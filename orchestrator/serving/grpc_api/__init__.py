"""Chat over gRPC on Ray Serve's own gRPC proxy: `colocate.v1.ChatService` (chat.proto).

Serve's proxy owns the gRPC server; `SERVICER_FUNCTION` is what its `grpc_servicer_functions`
names. The proxy calls the method named like the RPC (`Chat`, `Complete`) on the application's
ingress deployment (`orchestrator.serving.ingress.ColocateIngress`) with the request message,
and the ingress sends it down the same path as an HTTP request (`convert.py` does the mapping).
"""

SERVICE_NAME = "colocate.v1.ChatService"
SERVICER_FUNCTION = "orchestrator.serving.grpc_api.chat_pb2_grpc:add_ChatServiceServicer_to_server"
