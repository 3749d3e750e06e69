"""Settings (frozen attrs), discovery of ``fido.toml``, the default file, validation.

SKELETON: the settings classes below are the schema other modules rely on
(field names, types, defaults).  Discovery, parsing and validation are to be
implemented.
"""

import attr

MIB = 1024 * 1024


@attr.s(frozen=True, slots=True, auto_attribs=True)
class FidoSettings:
    accounts_file: str = "accounts.json.enc"  # absolute after loading
    key_file: str = "fido.key"  # absolute after loading; "" = plain JSON
    workers: int = 100
    poll_interval: float = 60.0
    dry_run: bool = False
    shard: str = "1/1"
    #: "auto" (inotify/kqueue/poll by platform) or "poll" (network file systems)
    watch: str = "auto"
    #: seconds a running session may take to finish its batch on SIGTERM
    grace_period: float = 20.0
    #: where the last good accounts set is cached ("" = next to the accounts file)
    state_dir: str = ""


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ImapSettings:
    connect_timeout: float = 30.0
    greeting_timeout: float = 30.0
    command_timeout: float = 60.0
    logout_timeout: float = 5.0
    #: bytes/second below which a literal (message body) transfer is aborted
    min_literal_rate: int = 4096
    #: UIDs per UID FETCH
    batch_messages: int = 25
    #: bytes (by RFC822.SIZE) per UID FETCH
    batch_bytes: int = 8 * MIB
    max_message_size: int = 50 * MIB
    #: keyword set on messages left on the server because they are too large
    too_large_keyword: str = "$FidoTooLarge"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class BackoffSettings:
    #: first retry delay after a transient failure, seconds
    initial: float = 30.0
    maximum: float = 1800.0
    #: first retry delay after an authentication failure
    auth_initial: float = 600.0
    auth_maximum: float = 21600.0
    #: +/- fraction of random jitter
    jitter: float = 0.2


@attr.s(frozen=True, slots=True, auto_attribs=True)
class RedisSettings:
    url: str = "redis://127.0.0.1:6379/0"
    stream: str = "fido:messages"
    max_backlog: int = 100000
    connect_timeout: float = 5.0
    command_timeout: float = 10.0


@attr.s(frozen=True, slots=True, auto_attribs=True)
class ReporterSettings:
    url: str = ""
    token: str = attr.ib(default="", repr=False)
    timeout: float = 10.0
    queue_size: int = 1000


@attr.s(frozen=True, slots=True, auto_attribs=True)
class HttpSettings:
    listen: str = "tcp:9119:interface=127.0.0.1"


@attr.s(frozen=True, slots=True, auto_attribs=True)
class LogSettings:
    level: str = "info"
    format: str = "text"
    #: "" = twistd's own log (stdout with -n, --logfile otherwise)
    file: str = ""
    rotate_length: int = 10 * MIB
    max_rotated_files: int = 10


@attr.s(frozen=True, slots=True, auto_attribs=True)
class Settings:
    fido: FidoSettings = attr.ib(factory=FidoSettings)
    imap: ImapSettings = attr.ib(factory=ImapSettings)
    backoff: BackoffSettings = attr.ib(factory=BackoffSettings)
    redis: RedisSettings = attr.ib(factory=RedisSettings)
    reporter: ReporterSettings = attr.ib(factory=ReporterSettings)
    http: HttpSettings = attr.ib(factory=HttpSettings)
    log: LogSettings = attr.ib(factory=LogSettings)
    #: the file these settings came from ("" when built in code)
    path: str = ""
