"""`deepseek-lm serve`: an OpenAI-compatible HTTP server over the continuous-batching engine, and its page.

    from deepseek_lm.serve.app import create_app      # FastAPI app over a started BatchEngine
    from deepseek_lm.serve.server import serve        # run it with uvicorn; Ctrl-C / SIGTERM stop it cleanly

Importing `deepseek_lm` never imports this package (FastAPI, uvicorn and prometheus_client load only here).
"""
