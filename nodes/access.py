"""What a ComfyUI client may reach through the pack: the folders a node input may name, and the Host names the
dashboard's routes answer. The person running ComfyUI allows more in an environment variable or in
`<ComfyUI user folder>/comfyui-finetune/access.toml`; a client of the server cannot.

Folders: a path is allowed when it lies inside an allowed root after every symlink is resolved, or when the path
as written (absolute, or relative to the input's base folder, with no `..` part) lies inside a root: a symlink
found there was put there by someone with access to the disk (no HTTP route of ComfyUI or of the pack makes one),
so a user's link in input/ to a photo folder elsewhere keeps working.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import folder_paths

from ..trainers import toml_reader
from .types import NodeError

ALLOW_FOLDERS_ENV = "COMFYUI_FINETUNE_ALLOW_FOLDERS"
ALLOW_HOSTS_ENV = "COMFYUI_FINETUNE_ALLOW_HOSTS"
SETTINGS_FOLDER = "comfyui-finetune"
SETTINGS_NAME = "access.toml"
LOOPBACK_NAMES = ("localhost",)


# ---- the settings ------------------------------------------------------------------------------------------------
def settings_file() -> Path:
    return Path(folder_paths.get_user_directory()) / SETTINGS_FOLDER / SETTINGS_NAME


def read_settings() -> dict:
    """access.toml's contents ({} when there is none); read at every use, so an edit needs no restart."""
    path = settings_file()
    try:
        data = toml_reader.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, UnicodeDecodeError, toml_reader.TOMLDecodeError) as exc:
        raise NodeError(f"{path} cannot be read ({exc}) — fix it, e.g. folders = [\"/photos\"] and "
                          "hosts = [\"mybox.lan\"], or delete it") from None
    for key in ("folders", "hosts"):
        value = data.get(key, [])
        if not isinstance(value, list) or not all(isinstance(item, str) for item in value):
            raise NodeError(f"{path}: `{key}` must be a list of strings, e.g. {key} = [\"...\"] — fix the file")
    return data


def listed(env_name: str, key: str, separator: str) -> list[str]:
    from_env = [item.strip() for item in os.environ.get(env_name, "").split(separator)]
    return [item for item in from_env + read_settings().get(key, []) if item.strip()]


def allowed_folders() -> list[Path]:
    return [Path(item).expanduser() for item in listed(ALLOW_FOLDERS_ENV, "folders", os.pathsep)]


def how_to_allow() -> str:
    return (f"or allow its folder: add it to the environment variable {ALLOW_FOLDERS_ENV} (several separated by "
            f"{os.pathsep!r}) before starting ComfyUI, or to `folders = [...]` in {settings_file()}")


# ---- folders -----------------------------------------------------------------------------------------------------
def data_roots() -> list[Path]:
    """Where training data may come from (and caption files go): ComfyUI's input folder and the allowed roots."""
    return [Path(folder_paths.get_input_directory()), *allowed_folders()]


def model_roots(folder_name: str) -> list[Path]:
    """Where a model of a kind may come from: ComfyUI's folders for it (models/<kind>/...) and the allowed roots."""
    return [Path(root) for root in folder_paths.get_folder_paths(folder_name)] + allowed_folders()


def inside(path: Path, roots: list[Path]) -> bool:
    """`path` lies inside a root: after resolving symlinks, or as written (no `..` part) — see the module's doc."""
    real = os.path.realpath(path)
    if any(within(real, os.path.realpath(root)) for root in roots):
        return True
    written = Path(os.path.abspath(path))
    return ".." not in Path(path).parts and any(within(str(written), os.path.abspath(root)) for root in roots)


def within(path: str, root: str) -> bool:
    try:
        return os.path.commonpath([path, root]) == root
    except ValueError:  # different drives
        return False


def confine(text: str, roots: list[Path], input_name: str) -> Path:
    """The path `text` names (absolute, or relative to the first root), or a NodeError when it lies outside
    every root."""
    if "\x00" in text:
        raise NodeError(f"`{input_name}`: {text!r} has a NUL character — type the path again")
    path = Path(text).expanduser()
    if not path.is_absolute():
        path = roots[0] / path
    if not inside(path, roots):
        raise NodeError(f"`{input_name}`: {text} is outside the folders the pack may use "
                        f"({', '.join(str(root) for root in roots)}) — put it inside {roots[0]}, {how_to_allow()}")
    return path


def confine_data(text: str, input_name: str) -> Path:
    return confine(text, data_roots(), input_name)


def confine_model(text: str, folder_name: str, input_name: str) -> Path:
    return confine(text, model_roots(folder_name), input_name)


# ---- hosts -------------------------------------------------------------------------------------------------------
def host_name(header: str) -> str:
    """The host of a Host header or an Origin's netloc, without port or IPv6 brackets, lower case."""
    text = header.strip().lower()
    if text.startswith("["):
        return text[1:].split("]", 1)[0]
    return text.rsplit(":", 1)[0] if text.count(":") == 1 else text


def ip_of(name: str) -> ipaddress.IPv4Address | ipaddress.IPv6Address | None:
    try:
        return ipaddress.ip_address(name)
    except ValueError:
        return None


def host_allowed(header: str, listen: str) -> bool:
    """Whether a request naming this Host may reach the routes: a loopback name or address, the address ComfyUI
    listens on (any address when it listens on all of them: DNS rebinding always sends a name, never an address),
    or a name the person running ComfyUI allows."""
    name = host_name(header)
    if not name:
        return False
    address = ip_of(name)
    if name in LOOPBACK_NAMES or name.endswith(".localhost") or (address is not None and address.is_loopback):
        return True
    listening = [ip_of(part.strip()) for part in listen.split(",") if part.strip()]
    if address is not None and any(ip is not None and (ip.is_unspecified or ip == address) for ip in listening):
        return True
    try:
        extra = {host_name(item) for item in listed(ALLOW_HOSTS_ENV, "hosts", ",")}
    except NodeError:
        extra = set()
    return name in extra


# ---- trainer settings that name a path ----------------------------------------------------------------------------
SETTING_PATHS = {("data", "validation_folder"): None, ("dreambooth", "class_folder"): None,
                 ("controlnet", "control_folder"): None, ("ddpo", "prompt_file"): None,
                 ("ddpo", "reference_folder"): None, ("model", "vae"): "vae", ("ddpo", "reward_model"): "reward_models",
                 ("ddpo", "aesthetic_head"): "reward_models"}
"""The `advanced` settings that name a file or folder, and their models/ folder (None: data, from input/)."""


def confine_settings(settings: dict) -> dict:
    """`settings` (sections of trainer settings) with each path setting confined and made absolute."""
    confined = {section: dict(values) for section, values in settings.items()}
    for (section, key), folder_name in SETTING_PATHS.items():
        value = confined.get(section, {}).get(key)
        if not isinstance(value, str) or not value.strip():
            continue
        name = f"advanced {section}.{key}"
        path = confine_data(value.strip(), name) if folder_name is None else \
            confine_model(value.strip(), folder_name, name)
        confined[section][key] = str(path)
    return confined


def comfyui_listen_address() -> str:
    """The address(es) ComfyUI was told to --listen on ("127.0.0.1" when it runs without its command line)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return "127.0.0.1"
    return str(getattr(args, "listen", "127.0.0.1") or "127.0.0.1")


def comfyui_cors_origin() -> str:
    """The origin ComfyUI's --enable-cors-header allows ("" when it allows none)."""
    try:
        from comfy.cli_args import args
    except ImportError:
        return ""
    return str(getattr(args, "enable_cors_header", "") or "")


def origin_allowed(origin: str, host: str) -> bool:
    """A request's Origin (when it has one) must be the page's own server — unless ComfyUI was told to allow that
    origin. `null` (a sandboxed frame, a file) is never one."""
    if origin.strip().lower() == "null":
        return False
    cors = comfyui_cors_origin()
    if cors and cors in ("*", origin):
        return True
    netloc = origin.split("://", 1)[-1].rstrip("/")
    return netloc.lower() == host.strip().lower() or (
        host_name(netloc) == host_name(host) and ":" not in netloc.split("]")[-1])
