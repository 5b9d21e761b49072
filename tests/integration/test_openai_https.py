"""The HTTP door with the gRPC port's TLS: HTTPS with the same certificate, and with a client CA set,
client certificates that name the caller (an allowed name gets in, another is refused with 403)."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from pathlib import Path

import aiohttp
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from tests.integration.conftest import Stack
from tests.integration.test_openai_http import body


def _name(common: str) -> x509.Name:
    return x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common)])


def _cert(
    subject: str,
    key: ec.EllipticCurvePrivateKey,
    issuer: tuple[x509.Name, ec.EllipticCurvePrivateKey],
    **kw: bool,
) -> x509.Certificate:
    now = datetime.datetime.now(datetime.UTC)
    builder = (
        x509.CertificateBuilder()
        .subject_name(_name(subject))
        .issuer_name(issuer[0])
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(hours=1))
        .add_extension(x509.BasicConstraints(ca=kw.get("ca", False), path_length=None), critical=True)
    )
    if kw.get("server"):
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]), critical=False
        )
    return builder.sign(issuer[1], hashes.SHA256())


def _write(path: Path, cert: x509.Certificate, key: ec.EllipticCurvePrivateKey) -> tuple[str, str]:
    cert_file, key_file = path.with_suffix(".crt"), path.with_suffix(".key")
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    return str(cert_file), str(key_file)


async def test_https_with_client_certificates_names_the_caller(stack: Stack, tmp_path: Path) -> None:
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca = _cert("test CA", ca_key, (_name("test CA"), ca_key), ca=True)
    ca_file, _ = _write(tmp_path / "ca", ca, ca_key)
    server_key = ec.generate_private_key(ec.SECP256R1())
    server = _write(
        tmp_path / "server", _cert("127.0.0.1", server_key, (ca.subject, ca_key), server=True), server_key
    )
    clients = {}
    for name in ("svc-a", "svc-b"):
        key = ec.generate_private_key(ec.SECP256R1())
        clients[name] = _write(tmp_path / name, _cert(name, key, (ca.subject, ca_key)), key)
    frontend = await stack.frontend(
        tls_cert_file=server[0],
        tls_key_file=server[1],
        tls_client_ca_file=ca_file,
        tls_allowed_client_names=("svc-a",),
    )
    await stack.worker()

    async def post(client: str) -> tuple[int, dict[str, object]]:
        context = ssl.create_default_context(cafile=ca_file)
        context.load_cert_chain(*clients[client])
        async with (
            aiohttp.ClientSession() as http,
            http.post(
                f"https://127.0.0.1:{frontend.http_port}/v1/chat/completions",
                json=body(max_tokens=2),
                ssl=context,
            ) as response,
        ):
            return response.status, await response.json()

    status, answer = await post("svc-a")
    assert status == 200, answer
    status, refused = await post("svc-b")
    assert status == 403
    assert refused["error"]["type"] == "permission_error"  # type: ignore[index]
