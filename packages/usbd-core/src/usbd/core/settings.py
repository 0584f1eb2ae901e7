"""The settings every daemon shares, and the value types drivers declare their own with.

A setting is one field of a pydantic model and has three spellings: a flag (``-store-size`` or
``--store-size``), an environment variable (``USBD_STORE_SIZE``) and a key in the TOML file
given with ``--config`` (``store-size``). A driver's settings carry its name as a prefix:
the ``objstore`` driver's field ``kind`` is ``-objstore-kind``, ``USBD_OBJSTORE_KIND`` and
``kind`` in an ``[objstore]`` table (or ``objstore-kind`` at the top level).

Each value type validates strings the way people type them and, when it refuses one, says what
is accepted: the command line turns that into one line naming the flag. :class:`Flag` metadata
tells the help and the generated configuration reference how to show a field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, Any, ClassVar, Literal

from pydantic import AfterValidator, BaseModel, BeforeValidator, ConfigDict, Field
from pydantic_settings import (
    BaseSettings,
    InitSettingsSource,
    NoDecode,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
)

from ._handshake import MAX_NAME_LENGTH, TLSMode
from ._keys import check_key_spec
from ._limits import DEFAULT_MAX_CONNECTIONS
from ._listen import parse_listen
from ._sizes import format_size, parse_size
from .kernel import DEFAULT_MAX_DEVICES, parse_device

__all__ = [
    "ENV_PREFIX",
    "AesKeySpec",
    "Attach",
    "CommonSettings",
    "Count",
    "Flag",
    "ListenAddresses",
    "LogLevel",
    "NbdDevice",
    "NoOptions",
    "Seconds",
    "Size",
    "StoreDir",
]

ENV_PREFIX = "USBD_"


@dataclass(frozen=True)
class Flag:
    """How a field shows in ``--help`` and the configuration reference.

    ``metavar`` names the value (SIZE, N, DIR); ``show`` prints a default the way a user
    would type it; ``secret`` keeps the value out of every message, log line and help text;
    ``group`` places a shared setting under a heading of the help.
    """

    metavar: str | None = None
    show: Any = None
    secret: bool = False
    group: str | None = None


def _size(value: object) -> object:
    return parse_size(value) if isinstance(value, str) else value


def _non_negative(value: int) -> int:
    if value < 0:
        raise ValueError(f"invalid size {value}: expected 0 or more bytes")
    return value


def _whole(minimum: int, what: str) -> Any:
    def parse(value: object) -> object:
        if isinstance(value, bool):  # a TOML true is not a count
            raise ValueError(f"invalid value {value!r}: expected {what}")  # noqa: TRY004
        if isinstance(value, str):
            text = value.strip()
            if not (text.isascii() and text.isdigit()):
                raise ValueError(f"invalid value {value!r}: expected {what}")
            value = int(text)
        if isinstance(value, int) and value < minimum:
            raise ValueError(f"invalid value {value!r}: expected {what}")
        return value

    return parse


def _device(value: object) -> object:
    return parse_device(value) if isinstance(value, str) else value


def _existing_dir(value: Path) -> Path:
    if not value.exists():
        raise ValueError(f"directory {str(value)!r} does not exist: expected an existing directory")
    if not value.is_dir():
        raise ValueError(f"{str(value)!r} is not a directory: expected an existing directory")
    return value


def _listen_list(value: object) -> object:
    """One address as a string (an environment variable, a TOML string) or several as a list
    (repeated flags, a TOML list); commas separate addresses in either, as the help says:
    ``USBD_LISTEN=/run/a.sock,127.0.0.1:10809`` and ``--listen /run/a.sock,:10809`` name two."""
    if isinstance(value, str):
        value = [value]
    if isinstance(value, list):
        return [
            part.strip()
            for item in value
            for part in (item.split(",") if isinstance(item, str) else [item])
            if not isinstance(part, str) or part.strip()
        ]
    return value


def _listen_address(value: str) -> str:
    parse_listen(value)
    return value


def _metrics_address(value: str | None) -> str | None:
    """``--metrics`` is TCP only: a unix socket path is no address Prometheus can scrape."""
    if value is None:
        return None
    try:
        where = parse_listen(value)
    except ValueError:
        where = None
    if where is None or where.path is not None:
        raise ValueError(
            f"invalid metrics address {value!r}: expected HOST:PORT (TCP, port 0 to 65535), "
            "such as 127.0.0.1:9100"
        )
    return value


def _key_spec(value: str | None) -> str | None:
    return check_key_spec(value)


def _octal_mode(value: object) -> object:
    """Permission bits as people type them: 0600, 600 or 0o660 (a TOML integer is taken
    as is, so 0o660 there, or a string)."""
    if isinstance(value, bool):
        raise ValueError(f"invalid mode {value!r}: expected octal permissions such as 0600")  # noqa: TRY004
    if isinstance(value, str):
        text = value.strip().lower().removeprefix("0o")
        if not text or any(c not in "01234567" for c in text):
            raise ValueError(f"invalid mode {value!r}: expected octal permissions such as 0600")
        value = int(text, 8)
    if isinstance(value, int) and not 0 <= value <= 0o777:
        raise ValueError(f"invalid mode {value:o}: expected octal permissions 0000 to 0777")
    return value


def _command(value: str | None) -> str | None:
    """A --run command: anything /bin/sh takes, but not nothing (an empty command would
    stop the daemon as soon as it serves, which is never what was meant)."""
    if value is not None and not value.strip():
        raise ValueError("an empty command: expected a shell command such as 'nbdinfo \"$uri\"'")
    return value


def _nbd_string(value: str) -> str:
    """Names and descriptions go to clients in option replies: the spec's 4096 bytes."""
    size = len(value.encode())
    if size > MAX_NAME_LENGTH:
        raise ValueError(f"{size} bytes is too long: expected at most {MAX_NAME_LENGTH} bytes")
    return value


#: Bytes, written as 512, 4KiB, "100 MiB", 1.5GiB or 2TB.
Size = Annotated[
    int, BeforeValidator(_size), AfterValidator(_non_negative), Flag("SIZE", format_size)
]
#: A whole number, 1 or more.
Count = Annotated[int, BeforeValidator(_whole(1, "a whole number >= 1")), Flag("N")]
#: Whole seconds, 0 or more.
Seconds = Annotated[int, BeforeValidator(_whole(0, "whole seconds (0 or more)")), Flag("SECONDS")]
#: A limit on how many: a whole number, 0 for none.
_Limit = Annotated[int, BeforeValidator(_whole(0, "a whole number (0: no limit)")), Flag("N")]
#: Unix permission bits, written in octal.
_Mode = Annotated[int, BeforeValidator(_octal_mode), Flag("MODE", lambda mode: f"{mode:04o}")]
#: /dev/nbdN (or nbdN), as its index.
NbdDevice = Annotated[int, BeforeValidator(_device), Flag("NBD_DEVICE", lambda n: f"/dev/nbd{n}")]
#: A directory that exists.
StoreDir = Annotated[Path, AfterValidator(_existing_dir), Flag("DIR")]
#: Where to serve NBD clients: HOST:PORT (TCP) or a unix socket path, repeatable.
ListenAddresses = Annotated[
    list[Annotated[str, AfterValidator(_listen_address)]],
    NoDecode,
    BeforeValidator(_listen_list),
    Flag("ADDR"),
]
#: An AES key source: key:<hex>, file:<path>, env:<VAR>, or unset for <store-dir>/key.aes.
AesKeySpec = Annotated[str | None, AfterValidator(_key_spec), Flag("SOURCE", secret=True)]
Attach = Literal["auto", "netlink", "ioctl", "none"]
LogLevel = Literal["debug", "info", "warning", "error"]


class NoOptions(BaseModel):
    """The options of a driver that has none (the ramdisk)."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class CommonSettings(BaseSettings):
    """Settings every daemon takes; the original project's flags first, then the new ones."""

    model_config = SettingsConfigDict(
        env_prefix=ENV_PREFIX,
        env_nested_delimiter="_",
        env_nested_max_split=1,
        extra="forbid",
        frozen=True,
    )

    #: Values read from the ``--config`` file; set on the class built for one command run.
    file_values: ClassVar[dict[str, Any]] = {}

    device: Annotated[NbdDevice | None, Flag(group="kernel")] = Field(
        None,
        description="the /dev/nbdX to export to (default: the first free one, unless --listen "
        "is given alone)",
    )
    store_dir: Annotated[StoreDir, Flag(group="storage")] = Field(
        Path("./"), description="location to create new backing disk files in"
    )
    store_name: Annotated[str, Flag("NAME", group="storage")] = Field(
        "test-lun", description="file base name to use for new backing disk files"
    )
    store_size: Annotated[Size, Flag(group="storage")] = Field(
        1 << 30,
        description="amount of storage capacity to use for new backing files (ex. 100 MiB, 20 GiB)",
    )
    nbd_max_devs: Annotated[Count, Flag(group="kernel")] = Field(
        DEFAULT_MAX_DEVICES,
        description="if the NBD kernel module is loaded by this daemon, how many NBD devices "
        "it should create",
    )
    listen: Annotated[ListenAddresses, Flag(group="serving")] = Field(
        default_factory=list,
        description="serve NBD clients on HOST:PORT (TCP) or a unix socket PATH; repeat the "
        "flag (or separate with commas) for several; may be combined with a kernel device",
    )
    export_name: Annotated[str, AfterValidator(_nbd_string), Flag("NAME", group="serving")] = Field(
        "", description="the export name clients ask for (default: the empty name)"
    )
    description: Annotated[str, AfterValidator(_nbd_string), Flag("TEXT", group="serving")] = Field(
        "", description="export description shown to clients"
    )
    read_only: Annotated[bool, Flag(group="serving")] = Field(
        False, description="refuse writes (the kernel device is read-only too)"
    )
    max_connections: Annotated[_Limit, Flag(group="serving")] = Field(
        DEFAULT_MAX_CONNECTIONS,
        description="network connections served at once over every listener (0: no limit); "
        "a client beyond it is refused with an error saying why; the kernel's do not count",
    )
    handshake_timeout: Annotated[Count, Flag("SECONDS", group="serving")] = Field(
        30, description="seconds a network client has to finish the NBD handshake"
    )
    idle_timeout: Annotated[Seconds, Flag(group="serving")] = Field(
        0,
        description="close a network connection that sends no request for this many seconds, "
        "once nothing is in flight (0: never)",
    )
    socket_mode: Annotated[_Mode, Flag(group="serving")] = Field(
        0o600,
        description="permissions of the unix sockets --listen creates, in octal (0600: only "
        "this user may connect; 0660 lets the socket's group in too)",
    )
    run: Annotated[str | None, AfterValidator(_command), Flag("COMMAND", group="serving")] = Field(
        None,
        description="captive mode, as nbdkit's --run: serve on a private unix socket too, run "
        "COMMAND with /bin/sh once serving ($uri, $nbd, $unixsocket, $exportname in its "
        "environment), then stop and exit with its status; no kernel device unless one is "
        "named or --attach asks for one",
    )
    attach: Annotated[Attach, Flag(group="kernel")] = Field(
        "auto",
        description="how to attach to /dev/nbdX: netlink where the kernel has it, else ioctl; "
        "none serves --listen only",
    )
    connections: Annotated[Count | None, Flag(group="kernel")] = Field(
        None,
        description="sockets between the kernel and the daemon (default 1; more only for "
        "devices safe for several connections)",
    )
    timeout: Annotated[Seconds, Flag(group="kernel")] = Field(
        0, description="per-request timeout in the kernel (0: warn and keep waiting)"
    )
    dead_timeout: Annotated[Seconds, Flag(group="kernel")] = Field(
        60,
        description="how long the kernel holds I/O for a daemon that died to be restarted and "
        "re-attach (netlink)",
    )
    log_level: Annotated[LogLevel, Flag(group="general")] = Field(
        "info", description="logging threshold"
    )
    metrics: Annotated[
        str | None, AfterValidator(_metrics_address), Flag("HOST:PORT", group="general")
    ] = Field(
        None,
        description="serve Prometheus metrics at http://HOST:PORT/metrics (requests, errors, "
        "latency, connections, the driver's figures); off by default; :PORT for every IPv4 "
        "interface, [::]:PORT for IPv6 too, port 0 for any free one",
    )
    tls: Annotated[TLSMode, Flag(group="tls")] = Field(
        "off",
        description="TLS for network clients (NBD_OPT_STARTTLS): off, on (clients may "
        "upgrade) or require (a plaintext client never reaches the export); the kernel "
        "device never uses it",
    )
    tls_certificates: Annotated[Path | None, Flag("DIR", group="tls")] = Field(
        None,
        description="directory holding server-cert.pem and server-key.pem (and ca-cert.pem "
        "for --tls-verify-peer), as nbdkit's --tls-certificates",
    )
    tls_verify_peer: Annotated[bool, Flag(group="tls")] = Field(
        False,
        description="require a client certificate signed by ca-cert.pem (and not in "
        "ca-crl.pem, if present)",
    )
    tls_psk: Annotated[Path | None, Flag("FILE", group="tls")] = Field(
        None,
        description="authenticate clients by pre-shared key: a file of username:hexkey "
        "lines, as nbdkit's --tls-psk (needs Python 3.13 or later)",
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        """Flags (passed as keyword arguments), then ``USBD_*``, then the file, then defaults."""
        file_settings = InitSettingsSource(settings_cls, init_kwargs=dict(cls.file_values))
        return (init_settings, env_settings, file_settings)
