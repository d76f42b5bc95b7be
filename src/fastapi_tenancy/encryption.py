"""`URLCipher`: encrypts tenants' database URLs at rest, with key rotation (needs `cryptography`)."""

from collections.abc import Iterable

from pydantic import SecretStr

from .errors import ConfigurationError, MissingDependencyError

try:
    from cryptography.fernet import Fernet, InvalidToken, MultiFernet
except ImportError as exc:  # pragma: no cover - depends on the installed extras
    raise MissingDependencyError("cryptography", "encryption") from exc

__all__ = ["URLCipher"]


class URLCipher:
    """Fernet (AES-128-CBC + HMAC-SHA256) over a list of keys. Safe for concurrent use.

    The first key encrypts; every key decrypts, so a new key can be put first while
    tokens made with the old ones still open. `rotate` re-encrypts a token under the
    first key. Never logs or repeats a URL or a key in its errors.

        cipher = URLCipher([URLCipher.generate_key()])
        token = cipher.encrypt("postgresql+asyncpg://app:secret@db2/app")
    """

    def __init__(self, keys: Iterable[str | SecretStr]) -> None:
        secrets = [key.get_secret_value() if isinstance(key, SecretStr) else key for key in keys]
        if not secrets:
            raise ConfigurationError(
                "encryption_keys is empty: a tenant's database_url is encrypted at rest; "
                "set TENANCY_ENCRYPTION_KEYS to a JSON list of keys from URLCipher.generate_key()"
            )
        fernets = []
        for position, secret in enumerate(secrets):
            try:
                fernets.append(Fernet(secret))
            except (ValueError, TypeError):
                # The key itself must not reach the message, only where it sits.
                raise ConfigurationError(
                    f"encryption_keys[{position}] is not a Fernet key (32 url-safe base64-encoded bytes)"
                ) from None
        self._primary = fernets[0]
        self._all = MultiFernet(fernets)

    @staticmethod
    def generate_key() -> str:
        """A new random key for `encryption_keys`."""
        return Fernet.generate_key().decode()

    def encrypt(self, plaintext: str) -> str:
        """The token of `plaintext`, under the first key."""
        return self._all.encrypt(plaintext.encode()).decode()

    def decrypt(self, token: str) -> str:
        """The plaintext of `token`; `ConfigurationError` if no key opens it."""
        try:
            return self._all.decrypt(token.encode()).decode()
        except InvalidToken:
            raise ConfigurationError(
                "a tenant's database_url cannot be decrypted with any of encryption_keys "
                "(was a key removed before rotate_encryption_keys() ran?)"
            ) from None

    def is_current(self, token: str) -> bool:
        """True when `token` was made with the first key (rotation has nothing to do)."""
        try:
            self._primary.decrypt(token.encode())
        except InvalidToken:
            return False
        return True

    def rotate(self, token: str) -> str:
        """`token` re-encrypted under the first key; `ConfigurationError` if no key opens it."""
        try:
            return self._all.rotate(token.encode()).decode()
        except InvalidToken:
            raise ConfigurationError(
                "a tenant's database_url cannot be decrypted with any of encryption_keys"
            ) from None
