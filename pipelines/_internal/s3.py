"""What the ``s3://`` store asks of S3: a store URI it accepts, a bucket it can use, and the
conditional put that commits a manifest.

A commit puts ``manifest.json`` with ``If-None-Match: *``, so that of two runs committing
one key exactly one put succeeds (``after_conditional_put`` says what the other does). A
server that ignores the condition would let both succeed: ``check_usable`` finds that out
once, when a store is opened for writing, with a probe object.
"""

from __future__ import annotations

import uuid

from ..errors import UserError

SCHEMES = ("s3",)


def parse_uri(root: str) -> tuple[str, str]:
    """(bucket, prefix) of a store URI; one clear message for one it does not accept."""
    scheme, _, rest = root.partition("://")
    if scheme not in SCHEMES:
        raise UserError(f"--store: scheme '{scheme}://' of {root!r} is not supported; "
                        f"allowed: a local path, file://, " +
                        ", ".join(f"{s}://bucket/prefix" for s in SCHEMES))
    if "?" in rest or "#" in rest:
        raise UserError(f"--store: {root!r} carries a query or fragment (options such as "
                        f"an endpoint go in the environment); allowed: s3://bucket/prefix, "
                        f"with AWS_ENDPOINT_URL and the credentials in the environment")
    bucket, _, prefix = rest.partition("/")
    if "@" in bucket or ":" in bucket:
        raise UserError("--store: the store URI carries credentials or a port, which would "
                        "be logged with every run; allowed: s3://bucket/prefix, with the "
                        "credentials and endpoint in the environment (AWS_ACCESS_KEY_ID, "
                        "AWS_SECRET_ACCESS_KEY, AWS_ENDPOINT_URL)")
    if not bucket:
        raise UserError(f"--store: {root!r} names no bucket; allowed: s3://bucket/prefix")
    return bucket, prefix.strip("/")


def after_conditional_put(error_code: str | None, winner_readable: bool) -> str:
    """What a commit does after its put of a manifest (``error_code``: None if the put
    succeeded, else the code of S3's refusal of a conditional put): ``done``, ``adopt`` the
    manifest another run committed, or ``retry`` the put. S3 answers 412
    ``PreconditionFailed`` when the manifest exists, and 409 ``ConditionalRequestConflict``
    while a concurrent write of the same key is in flight, which AWS says to retry: that
    write may yet fail."""
    if error_code is None:
        return "done"
    if error_code == "PreconditionFailed" and winner_readable:
        return "adopt"
    return "retry"  # a conflict in flight, or a manifest removed since (gc): put again


def put(client, bucket: str, key: str, body: bytes, conditional: bool) -> str | None:
    """Put an object (``conditional``: only if none exists at ``key``); None, or the
    error code of a conditional put that S3 refused."""
    from botocore.exceptions import ClientError
    try:
        client.put_object(Bucket=bucket, Key=key, Body=body,
                          **({"IfNoneMatch": "*"} if conditional else {}))
    except ClientError as e:
        code = e.response.get("Error", {}).get("Code")
        if code not in ("PreconditionFailed", "ConditionalRequestConflict"):
            raise
        return code
    return None


def check_usable(store, create: bool) -> None:
    """A clear message when the bucket of ``store`` (a ``RemoteStore``) cannot be reached,
    read or (``create``) written, or when its server ignores the conditional put that
    commits a manifest."""
    from botocore.exceptions import BotoCoreError, ClientError
    honoured = True
    try:
        if create:
            name = uuid.uuid4().hex
            probe = store._path("_probe", name)
            with store.fs.open_output_stream(probe) as f:
                f.write(b"ok")
            # a second, conditional put that must be refused: commits rely on it
            honoured = store._put(store._key("_probe", name), b"again", True) is not None
            store.fs.delete_file(probe)
        else:
            store.fs.get_file_info(store._path())
    except (OSError, BotoCoreError, ClientError) as e:
        cause = str(e).splitlines()[0][:300]
        raise UserError(f"--store: store {store.root!r} cannot be "
                        f"{'written' if create else 'read'} ({cause}); allowed: "
                        f"s3://bucket/prefix of an existing bucket that the credentials "
                        f"in the environment may {'write' if create else 'read'}") from None
    if not honoured:
        raise UserError(f"--store: the S3 server of {store.root!r} ignores conditional "
                        f"writes (a put with If-None-Match: * replaced an existing "
                        f"object), so two runs could both commit one artifact; allowed: a "
                        f"server that honours If-None-Match on PutObject (AWS S3 does)")
