"""The verifier tiers (`hilm-serve --tier llm|ilm`): exact block verification inside vLLM.

    rejection.py (pure math) <- worker.py (hook in vLLM's worker) <- wire.py (what crosses to it)
    session.py (session state, validation) <- core.py (Verifier: engine calls) <- service.py (gRPC)
    tier.py: what hilm-serve loads; client.py: a typed async client.
"""
