"""The soak's users (hilm_vllm/lab/soak/users.py): OpenAI SSE and gRPC Generate on the router.

    locust -f locustfiles/soak.py --host http://127.0.0.1:8000 --grpc-address 127.0.0.1:50051
    python bench/soak.py          # launches the four tiers and runs this headless (make soak)
"""

from hilm_vllm.lab.soak.users import GrpcGenerateUser, SseUser  # noqa: F401
