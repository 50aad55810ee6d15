"""Test helper: a real ComfyUI server (CI's core, see comfyui_env.py) with this repository as a custom node pack.

Each server gets a fresh base folder: models/ (checkpoints, embeddings, ...), input/, output/, temp/, user/ and
custom_nodes/identity_tokens (a symlink to the repository). The March-2024 core has no --base-directory flag, so a small
launcher written here re-roots folder_paths' model and custom-node folders before it runs ComfyUI's main.py; input,
output and temp use main.py's own flags. Prompts go in through POST /prompt; every websocket message is collected.
"""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tests.comfyui_env import PACK_MODULE, ROOT

HOST = "127.0.0.1"
CHECKPOINT_NAME = "tiny_sd15.safetensors"
MODEL_FOLDERS = ("checkpoints", "embeddings", "loras", "vae", "clip", "clip_vision", "upscale_models", "configs")

# Runs inside the server's interpreter: argv = [launcher, comfyui_dir, base_dir, *main.py arguments].
LAUNCHER = '''"""Start ComfyUI's main.py with the model, custom-node and user folders moved under a base folder."""
import os
import runpy
import sys

comfyui, base = sys.argv[1], sys.argv[2]
sys.argv = [os.path.join(comfyui, "main.py"), *sys.argv[3:]]
sys.path.insert(0, comfyui)
os.chdir(comfyui)
import comfy.options  # noqa: E402

comfy.options.enable_args_parsing()
import folder_paths  # noqa: E402

old_models, new_models = folder_paths.models_dir, os.path.join(base, "models")


def moved(path):
    """The path under the new models folder when it was under the old one."""
    if path == old_models or path.startswith(old_models + os.sep):
        return new_models + path[len(old_models):]
    return path


for name, (paths, extensions) in list(folder_paths.folder_names_and_paths.items()):
    folder_paths.folder_names_and_paths[name] = ([moved(p) for p in paths], extensions)
custom_nodes = folder_paths.folder_names_and_paths["custom_nodes"]
folder_paths.folder_names_and_paths["custom_nodes"] = ([os.path.join(base, "custom_nodes")], custom_nodes[1])
folder_paths.models_dir = new_models
folder_paths.user_directory = os.path.join(base, "user")
runpy.run_path(sys.argv[0], run_name="__main__")
'''


SAMPLE_PHOTOS = {"coffee.png": (600, 400), "chelsea.png": (451, 300)}  # scikit-image's photos: name -> (width, height)


def write_sample_photos(folder: Path) -> list[Path]:
    """scikit-image's bundled coffee and chelsea photos (sizes unlike the 512x512 astronaut) as PNGs in folder."""
    import skimage.data
    from PIL import Image

    bundled = Path(str(skimage.data.__file__)).parent  # read the files it ships: never a download
    paths = []
    for name, size in SAMPLE_PHOTOS.items():
        with Image.open(bundled / name) as image:
            rgb = image.convert("RGB")
        assert rgb.size == size, f"scikit-image's {name} is {rgb.size}, expected {size}"
        rgb.save(folder / name)
        paths.append(folder / name)
    return paths


class ServerError(RuntimeError):
    """The server did not start, died, or did not answer in time; the message ends with its log."""


@dataclass
class RunResult:
    """What one prompt did: its id, status, websocket messages, history entry and error text."""

    prompt_id: str | None
    status: str  # 'success', 'error', 'interrupted' or 'invalid' (rejected by /prompt's validation)
    messages: list[dict[str, Any]] = field(default_factory=list)
    history: dict[str, Any] = field(default_factory=dict)
    error: str = ""
    node_errors: dict[str, Any] = field(default_factory=dict)
    folders: dict[str, Path] = field(default_factory=dict)  # 'output' / 'temp' / 'input' -> folder
    seconds: float = 0.0
    received: list[float] = field(default_factory=list)  # monotonic time of each message, parallel to messages

    def of_type(self, kind: str) -> list[dict[str, Any]]:
        """The data of every websocket message of one type ('progress', 'executed', 'execution_error', ...)."""
        return [m.get("data", {}) for m in self.messages if m.get("type") == kind]

    def progress(self, node_id: str | None = None) -> list[dict[str, Any]]:
        """The 'progress' messages (value, max, node), optionally of one node."""
        return [d for d in self.of_type("progress") if node_id is None or str(d.get("node")) == str(node_id)]

    def outputs(self, node_id: str) -> dict[str, Any]:
        """The UI output a node left in the history entry ({} when none)."""
        return self.history.get("outputs", {}).get(str(node_id), {})

    def files(self, kind: str = "output", node_id: str | None = None) -> list[Path]:
        """Paths of the images the history lists for one folder type (all nodes, or one node)."""
        entries = self.history.get("outputs", {})
        nodes = [str(node_id)] if node_id is not None else list(entries)
        paths = []
        for node in nodes:
            for image in entries.get(node, {}).get("images", []):
                if image.get("type") == kind:
                    paths.append(self.folders[kind] / image.get("subfolder", "") / image["filename"])
        return paths

    def node_seconds(self) -> dict[str, float]:
        """Seconds between each node's 'executing' message and the next one (a rough per-node timing)."""
        times: dict[str, float] = {}
        current, since = None, 0.0
        for message, at in zip(self.messages, self.received):
            if message.get("type") != "executing":
                continue
            if current is not None:
                times[current] = times.get(current, 0.0) + at - since
            current, since = message.get("data", {}).get("node"), at
        return times

    def describe(self) -> str:
        """A one-paragraph summary for assertion messages."""
        kinds = [m.get("type") for m in self.messages]
        return f"status={self.status} prompt_id={self.prompt_id} error={self.error!r} messages={kinds}"


def free_port() -> int:
    """A TCP port that nothing listens on right now."""
    with socket.socket() as probe:
        probe.bind((HOST, 0))
        return int(probe.getsockname()[1])


def _exception_text(data: dict[str, Any]) -> str:
    """'NodeType (node id): ExceptionType: message' for an execution_error message."""
    return (
        f"{data.get('node_type')} (node {data.get('node_id')}): "
        f"{data.get('exception_type')}: {data.get('exception_message', '').strip()}"
    )


def _validation_text(body: dict[str, Any]) -> str:
    """A readable text for a 400 answer of /prompt: the error and every node error."""
    error = body.get("error", {})
    if isinstance(error, dict):
        parts = [f"{error.get('message', '')} {error.get('details', '')}".strip()]
    else:
        parts = [str(error)]
    for node_id, problem in (body.get("node_errors") or {}).items():
        for item in problem.get("errors", []):
            parts.append(f"{problem.get('class_type')} (node {node_id}): {item.get('message')}: {item.get('details')}")
    return "; ".join(p for p in parts if p)


class ComfyServer:
    """One ComfyUI server process on a free local port, with its own base folder and log file."""

    def __init__(self) -> None:
        self.process: subprocess.Popen[bytes] | None = None
        self.base = Path()
        self.port = 0
        self.log_path = Path()
        self._log_handle: Any = None

    # ---------------------------------------------------------------- folders

    @property
    def url(self) -> str:
        """http://host:port of the server."""
        return f"http://{HOST}:{self.port}"

    @property
    def input_dir(self) -> Path:
        """The server's input folder (LoadImage reads it)."""
        return self.base / "input"

    @property
    def output_dir(self) -> Path:
        """The server's output folder (SaveImage writes it)."""
        return self.base / "output"

    @property
    def temp_dir(self) -> Path:
        """The server's temp folder (main.py puts 'temp' under the --temp-directory it is given)."""
        return self.base / "temp" / "temp"

    @property
    def embeddings_dir(self) -> Path:
        """The server's only embeddings folder."""
        return self.base / "models" / "embeddings"

    @property
    def checkpoints_dir(self) -> Path:
        """The server's checkpoints folder."""
        return self.base / "models" / "checkpoints"

    def _prepare(self, base: Path, checkpoint: Path | None, photo: Path | None, pack: Path) -> None:
        """Create the fresh base folder: model folders, input images, custom_nodes with the repository."""
        if base.exists():
            shutil.rmtree(base)
        for name in MODEL_FOLDERS:
            (base / "models" / name).mkdir(parents=True)
        for name in ("input", "output", "temp", "user", "custom_nodes"):
            (base / name).mkdir()
        (base / "custom_nodes" / PACK_MODULE).symlink_to(Path(pack).resolve(), target_is_directory=True)
        if checkpoint is not None:
            (base / "models" / "checkpoints" / CHECKPOINT_NAME).symlink_to(Path(checkpoint).resolve())
        if photo is not None:
            from PIL import Image, ImageOps

            with Image.open(photo) as image:
                rgb = image.convert("RGB")
            rgb.save(base / "input" / "astronaut.png")
            ImageOps.mirror(rgb).save(base / "input" / "astronaut_flip.png")
            write_sample_photos(base / "input")
        (base / "launch_comfyui.py").write_text(LAUNCHER)

    # ---------------------------------------------------------------- process

    def start(
        self,
        comfyui_dir: Path,
        base_dir: Path,
        checkpoint: Path | None = None,
        photo: Path | None = None,
        timeout: float = 120.0,
        extra_args: tuple[str, ...] = (),
        pack: Path = ROOT,
        python: str = sys.executable,
    ) -> ComfyServer:
        """Create the base folder, start main.py on a free port and wait until /object_info answers.

        checkpoint is linked as models/checkpoints/tiny_sd15.safetensors, photo is copied to input/astronaut.png (and
        mirrored to astronaut_flip.png) next to SAMPLE_PHOTOS' other photos (coffee.png, chelsea.png: other sizes), pack
        (default: this repository) is linked as custom_nodes/identity_tokens; python runs the server (another venv's, for
        another ComfyUI).
        """
        if not (Path(comfyui_dir) / "main.py").is_file():
            raise ServerError(f"{comfyui_dir} is not a ComfyUI folder (no main.py)")
        self.base = Path(base_dir).resolve()
        self._prepare(self.base, checkpoint, photo, pack)
        self.port = free_port()
        self.log_path = self.base / "server.log"
        self._log_handle = open(self.log_path, "wb")  # closed in stop()
        command = [
            python, "-u", str(self.base / "launch_comfyui.py"),
            str(Path(comfyui_dir).resolve()), str(self.base),
            "--cpu", "--listen", HOST, "--port", str(self.port), "--disable-auto-launch",
            "--input-directory", str(self.input_dir), "--output-directory", str(self.output_dir),
            "--temp-directory", str(self.base / "temp"), *extra_args,
        ]  # fmt: skip
        env = {**os.environ, "PYTHONUNBUFFERED": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
        self.process = subprocess.Popen(
            command, cwd=comfyui_dir, env=env, stdout=self._log_handle, stderr=subprocess.STDOUT
        )
        try:
            self._wait_ready(timeout)
        except BaseException:
            self.stop()
            raise
        return self

    def _wait_ready(self, timeout: float) -> None:
        """Poll /object_info until it answers 200; ServerError (with the log) when the process dies or time runs out."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_alive()
            try:
                with urllib.request.urlopen(self.url + "/object_info", timeout=10) as answer:
                    if answer.status == 200:
                        return
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(0.3)
        raise self._failure(f"ComfyUI did not answer /object_info within {timeout:.0f} s")

    def _check_alive(self) -> None:
        """Raise ServerError with the log when the server process has exited."""
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise self._failure(f"ComfyUI exited (return code {code})")

    def log(self) -> str:
        """The server's log so far."""
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def _failure(self, what: str) -> ServerError:
        """A ServerError whose message ends with the log (also printed, so pytest shows it)."""
        text = self.log()
        print(f"----- ComfyUI log ({self.log_path}) -----\n{text}\n----- end of log -----")
        return ServerError(f"{what}; log {self.log_path}:\n{text[-20000:]}")

    def stop(self) -> None:
        """Terminate the server (kill it if it does not exit in 15 s) and close the log."""
        if self.process is not None and self.process.poll() is None:
            self.process.terminate()
            try:
                self.process.wait(timeout=15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait(timeout=15)
        if self._log_handle is not None:
            self._log_handle.close()
            self._log_handle = None

    # ---------------------------------------------------------------- HTTP

    def _request(self, path: str, payload: dict[str, Any] | None = None, timeout: float = 60) -> tuple[int, Any]:
        """GET (payload None) or POST JSON; return (HTTP status, decoded JSON or text) without raising on 4xx/5xx."""
        data = None if payload is None else json.dumps(payload).encode()
        request = urllib.request.Request(self.url + path, data=data, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=timeout) as answer:
                status, body = answer.status, answer.read()
        except urllib.error.HTTPError as error:
            status, body = error.code, error.read()
        try:
            return status, json.loads(body) if body else None
        except ValueError:
            return status, body.decode(errors="replace")

    def get_json(self, path: str) -> Any:
        """GET a JSON endpoint ('/extensions', '/embeddings', ...); assert it answered 200."""
        status, body = self._request(path)
        assert status == 200, f"{path} answered {status}: {body}"
        return body

    def object_info(self, node_class: str | None = None) -> dict[str, Any]:
        """GET /object_info (every node class, or one)."""
        return self.get_json("/object_info" + (f"/{node_class}" if node_class else ""))

    def history(self, prompt_id: str) -> dict[str, Any]:
        """GET /history/<prompt_id>: the entry for that prompt ({} while it has none)."""
        status, body = self._request(f"/history/{prompt_id}")
        return body.get(prompt_id, {}) if status == 200 and isinstance(body, dict) else {}

    def interrupt(self) -> None:
        """POST /interrupt: stop the prompt that is running."""
        self._request("/interrupt", {})

    def run(
        self,
        prompt: dict[str, Any],
        timeout: float = 300,
        on_message: Callable[[dict[str, Any]], None] | None = None,
    ) -> RunResult:
        """Queue an API-format prompt, collect its websocket messages until it finishes; node errors do not raise."""
        import websocket  # websocket-client

        self._check_alive()
        client_id = uuid.uuid4().hex
        folders = {"output": self.output_dir, "temp": self.temp_dir, "input": self.input_dir}
        started = time.monotonic()
        connection = websocket.create_connection(f"ws://{HOST}:{self.port}/ws?clientId={client_id}", timeout=30)
        try:
            status, body = self._request("/prompt", {"prompt": prompt, "client_id": client_id})
            if status == 400 and isinstance(body, dict):
                return RunResult(
                    None, "invalid", error=_validation_text(body), node_errors=body.get("node_errors") or {},
                    folders=folders, seconds=time.monotonic() - started,
                )  # fmt: skip
            if status != 200 or not isinstance(body, dict) or "prompt_id" not in body:
                raise self._failure(f"/prompt answered {status}: {body}")
            prompt_id = body["prompt_id"]
            messages, received = self._collect(connection, prompt_id, started + timeout, on_message)
        finally:
            connection.close()
        history = self._wait_history(prompt_id, deadline=time.monotonic() + 30)
        result = RunResult(prompt_id, "success", messages, history, node_errors=body.get("node_errors") or {},
                           folders=folders, seconds=time.monotonic() - started, received=received)  # fmt: skip
        mine = [m for m in messages if m.get("data", {}).get("prompt_id") == prompt_id]
        errors = [m["data"] for m in mine if m.get("type") == "execution_error"]
        if any(m.get("type") == "execution_interrupted" for m in mine):
            result.status = "interrupted"
        elif errors:
            result.status, result.error = "error", "\n".join(_exception_text(e) for e in errors)
        elif history.get("status", {}).get("status_str") != "success":
            result.status, result.error = "error", f"history status: {history.get('status')}"
        elif result.node_errors:  # some outputs failed validation and were dropped; the others ran
            result.error = _validation_text(body)
        return result

    def _collect(
        self,
        connection: Any,
        prompt_id: str,
        deadline: float,
        on_message: Callable[[dict[str, Any]], None] | None,
    ) -> tuple[list[dict[str, Any]], list[float]]:
        """JSON messages (and when each came) until 'executing' with node None for prompt_id; binary frames skipped."""
        import websocket

        messages: list[dict[str, Any]] = []
        received: list[float] = []
        while True:
            if time.monotonic() > deadline:
                self.interrupt()
                raise self._failure(f"prompt {prompt_id} did not finish in time; messages: {messages[-20:]}")
            connection.settimeout(1.0)
            try:
                frame = connection.recv()
            except websocket.WebSocketTimeoutException:
                self._check_alive()
                continue
            except websocket.WebSocketConnectionClosedException as error:
                raise self._failure(f"websocket closed while prompt {prompt_id} ran") from error
            if isinstance(frame, bytes):
                continue
            message = json.loads(frame)
            messages.append(message)
            received.append(time.monotonic())
            if on_message is not None:
                on_message(message)
            data = message.get("data", {})
            if message.get("type") == "executing" and data.get("node") is None and data.get("prompt_id") == prompt_id:
                return messages, received

    def _wait_history(self, prompt_id: str, deadline: float) -> dict[str, Any]:
        """The history entry of a finished prompt (it is written just before the final 'executing' message)."""
        while True:
            entry = self.history(prompt_id)
            if entry or time.monotonic() > deadline:
                return entry
            time.sleep(0.1)
