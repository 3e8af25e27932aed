"""TLS certificates and SuperNode keys for a secure deployment, made with ``cryptography``.

A private CA signs the SuperLink's certificate (its host names and IP addresses in the subject
alternative names); each SuperNode gets an ECDSA P-384 key pair, whose OpenSSH public key is
registered with the SuperLink (``flwr supernode register``) so that only those nodes may join.
Nothing here is hand-rolled cryptography: keys, signatures and encodings are the library's.

Command line: ``byzflower credentials DIR --host NAME_OR_IP ... --supernodes K``.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID


@dataclass(frozen=True)
class Credentials:
    """Paths of the files a secure deployment uses."""

    folder: Path
    ca_cert: Path  # give to every SuperNode and to the flwr CLI (root-certificates)
    server_cert: Path  # the SuperLink's
    server_key: Path
    node_keys: tuple[Path, ...]  # one private key per SuperNode (--auth-supernode-private-key)

    def node_public_key(self, i: int) -> Path:
        return self.node_keys[i].with_suffix(".pub")


def _write_private(path: Path, data: bytes) -> None:
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(data)


def _name(common: str) -> x509.Name:
    return x509.Name(
        [x509.NameAttribute(NameOID.ORGANIZATION_NAME, "byzflower"), x509.NameAttribute(NameOID.COMMON_NAME, common)]
    )


_LABEL = re.compile(r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)")


def parse_host(host: str) -> x509.GeneralName:
    """A host as the certificate names it: an IP address (IPv6 with or without brackets) or a DNS name
    (dot-separated labels of 1-63 letters, digits and '-', 253 characters at most); ValueError naming
    it otherwise (a certificate for 'a b' or '' would never match the name devices connect to)."""
    bare = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        return x509.IPAddress(ipaddress.ip_address(bare))
    except ValueError:
        pass
    name = host[:-1] if host.endswith(".") else host
    if not 0 < len(name) <= 253 or not all(_LABEL.fullmatch(label) for label in name.split(".")):
        raise ValueError(
            f"host {host!r} is not an IP address or a DNS name (dot-separated labels of 1-63 letters, "
            "digits and '-', 253 characters at most)"
        )
    return x509.DNSName(name)


class CredentialsExist(FileExistsError):
    """The folder already holds credentials that new ones would replace."""


def make_credentials(
    folder: str | Path, hosts: list[str], supernodes: int, days: int = 365, replace: bool = False
) -> Credentials:
    """A CA, a SuperLink certificate valid for ``hosts`` and ``supernodes`` node key pairs in ``folder``.

    Credentials already there are replaced only with ``replace``: a new CA and new keys lock out
    every device set up with the old ones (CredentialsExist names the files otherwise)."""
    if not hosts:
        raise ValueError("the SuperLink certificate needs at least one host name or IP address")
    alt_names = [parse_host(h) for h in hosts]  # before anything is written
    if supernodes < 0:
        raise ValueError(f"supernodes={supernodes} must be >= 0")
    folder = Path(folder)
    names = ["ca.crt", "ca.key", "server.pem", "server.key"]
    names += [f"supernode-{i}{suffix}" for i in range(supernodes) for suffix in ("", ".pub")]
    there = [n for n in names if (folder / n).exists()]
    if there and not replace:
        shown = ", ".join(there[:6]) + (f" and {len(there) - 6} more" if len(there) > 6 else "")
        raise CredentialsExist(
            f"{folder} already holds credentials ({shown}): new ones would lock out every device set up with "
            "them (their CA certificate, their registered keys); write them to another folder, or replace them "
            "with --replace"
        )
    folder.mkdir(parents=True, exist_ok=True)
    now = datetime.datetime.now(datetime.UTC)
    start, end = now - datetime.timedelta(minutes=5), now + datetime.timedelta(days=days)

    ca_key = ec.generate_private_key(ec.SECP384R1())
    ca = (
        x509.CertificateBuilder()
        .subject_name(_name("byzflower CA"))
        .issuer_name(_name("byzflower CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                key_cert_sign=True,
                crl_sign=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .sign(ca_key, hashes.SHA384())
    )
    server_key = ec.generate_private_key(ec.SECP384R1())
    server = (
        x509.CertificateBuilder()
        .subject_name(_name("byzflower SuperLink"))  # (a host may exceed the 64 characters a CN allows)
        .issuer_name(ca.subject)
        .public_key(server_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(start)
        .not_valid_after(end)
        .add_extension(x509.SubjectAlternativeName(alt_names), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(x509.ExtendedKeyUsage([x509.oid.ExtendedKeyUsageOID.SERVER_AUTH]), critical=False)
        .sign(ca_key, hashes.SHA384())
    )
    pem = serialization.Encoding.PEM
    ca_path, cert_path, key_path = folder / "ca.crt", folder / "server.pem", folder / "server.key"
    ca_path.write_bytes(ca.public_bytes(pem))
    cert_path.write_bytes(server.public_bytes(pem))
    _write_private(
        key_path,
        server_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()),
    )
    _write_private(
        folder / "ca.key",
        ca_key.private_bytes(pem, serialization.PrivateFormat.TraditionalOpenSSL, serialization.NoEncryption()),
    )
    node_keys = tuple(make_node_key(folder / f"supernode-{i}") for i in range(supernodes))
    return Credentials(folder, ca_path, cert_path, key_path, node_keys)


def make_node_key(path: str | Path) -> Path:
    """An ECDSA P-384 key pair: ``path`` (private, OpenSSH format, mode 600) and ``path.pub``."""
    path = Path(path)
    key = ec.generate_private_key(ec.SECP384R1())
    _write_private(
        path,
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.OpenSSH, serialization.NoEncryption()
        ),
    )
    public = key.public_key().public_bytes(serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH)
    path.with_suffix(".pub").write_bytes(public + b"\n")
    return path
