"""The yardstick for ``api_load.py``: the least a FastAPI endpoint can do, served the same way."""

from fastapi import FastAPI

app = FastAPI()


@app.get("/ping")
def ping() -> dict:
    return {"status": "ok"}
