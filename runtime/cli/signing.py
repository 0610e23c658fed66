"""``ufad keygen`` / ``ufad sign`` / ``ufad verify``: authenticity of detector files."""

from __future__ import annotations

from pathlib import Path

import click


@click.command("keygen")
@click.argument("key", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--force", is_flag=True, help="Overwrite an existing key pair.")
def keygen_command(key, force):
    """Write a new Ed25519 key pair: KEY (private, mode 0600: keep it secret) and KEY.pub
    (public: give it to whoever loads your detectors)."""
    from .. import signing

    priv, pub = signing.generate_keypair(key, overwrite=force)
    kid = signing.key_id(signing.load_public_key(pub))
    click.echo(f"wrote {priv} (private, keep it secret) and {pub} (public); key id {kid}")


@click.command("sign")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="Ed25519 private key (PEM), e.g. from `ufad keygen KEY`.")
@click.option("-o", "--output", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Write the signed file here (default: sign MODEL in place).")
def sign_command(model, key, output):
    """Sign MODEL: its integrity is checked, then a signature over its content digest is
    stored inside it (metadata ufad.signature)."""
    from .. import signing
    from ..files import write_atomically
    from ..session import read_model_bytes

    private = signing.load_private_key(key)
    signed = signing.sign(read_model_bytes(model), private, str(model))
    out = output or model
    write_atomically(out, signed)
    click.echo(f"signed {out} with key {signing.key_id(private.public_key())}")


@click.command("verify")
@click.argument("model", type=click.Path(dir_okay=False, path_type=Path))
@click.option("--key", type=click.Path(dir_okay=False, path_type=Path), default=None,
              help="Ed25519 public key (PEM): also require a valid signature by it.")
def verify_command(model, key):
    """Check MODEL's integrity (graph, metadata, header) and, with --key, its signature.
    Exits 0 when every check passes, 2 otherwise."""
    from .. import signing
    from ..session import read_model_bytes, verified_parts

    parts, info = verified_parts(read_model_bytes(model), str(model))
    click.echo(f"{model}: integrity ok (format {info.format_version}, graph sha256 "
               f"{info.graph_sha256[:16]}..., content sha256 {parts.content_sha256[:16]}...)")
    if key is None:
        click.echo(f"signature: {'present, not checked (pass --key KEY.pub)' if info.signed else 'none'}")
        return
    kid = signing.verify(parts, key, str(model))
    click.echo(f"signature: valid, by key {kid}")
