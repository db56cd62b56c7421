"""A one-page PDF of text lines: what ``invoice_pdf`` answers.

A real, minimal PDF 1.4 file (catalog, page tree, one page, one content stream,
the standard Helvetica font, a cross-reference table with exact byte offsets),
so a PDF reader opens it and extracts its text. Not a typesetter: ASCII lines,
top to bottom.
"""

from __future__ import annotations

from collections.abc import Sequence

__all__ = ["render_pdf"]


def _escape(text: str) -> str:
    ascii_text = text.encode("ascii", "replace").decode("ascii")
    return ascii_text.replace("\\", "\\\\").replace("(", "\\(").replace(")", "\\)")


def render_pdf(title: str, lines: Sequence[str]) -> bytes:
    """A PDF showing ``title`` in a larger font, then each of ``lines``."""
    text = ["BT", "/F1 18 Tf", "72 770 Td", f"({_escape(title)}) Tj", "/F1 11 Tf", "0 -30 Td"]
    for line in lines:
        text += [f"({_escape(line)}) Tj", "0 -16 Td"]
    text.append("ET")
    content = "\n".join(text).encode("ascii")
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] "
        b"/Resources << /Font << /F1 5 0 R >> >> /Contents 4 0 R >>",
        b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe2\xe3\xcf\xd3\n")
    offsets = []
    for number, body in enumerate(objects, start=1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % number + body + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    for offset in offsets:
        out += b"%010d 00000 n \n" % offset
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1,
        xref,
    )
    return bytes(out)
