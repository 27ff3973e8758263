"""The SOAP face of the key endpoint (seed 001): read a `generateMapToken` envelope, answer with the key or a
Fault, in the SOAP version the client used (1.1 `text/xml`, 1.2 `application/soap+xml`).

The map is read in both shapes clients send: `<entry key="user" value="joao"/>` (as in the seed) and
`<entry><key>user</key><value>joao</value></entry>` (JAX-WS's serialisation of a Map).

Parsing is done with expat directly so that any document type declaration is refused before it is read:
no DTD means no entity definitions, hence no entity expansion ("billion laughs") and no external entities
(XXE, OWASP XML External Entity Prevention Cheat Sheet) — the approach of `defusedxml`, without the dependency.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any
from xml.parsers import expat
from xml.sax.saxutils import escape, quoteattr

from sidecar.errors import SoapError

__all__ = ["SoapError", "SoapRequest", "fault", "generate_map_token_reply", "parse_generate_map_token",
           "soap_version_of"]

SOAP11 = "http://schemas.xmlsoap.org/soap/envelope/"
SOAP12 = "http://www.w3.org/2003/05/soap-envelope"
_ENVELOPES = {SOAP11: "1.1", SOAP12: "1.2"}
_NS_OF = {"1.1": SOAP11, "1.2": SOAP12}
_CONTENT_TYPE = {"1.1": "text/xml; charset=utf-8", "1.2": "application/soap+xml; charset=utf-8"}
OPERATION = "generateMapToken"


@dataclass
class SoapRequest:
    version: str
    operation_ns: str
    entries: dict[str, Any] = field(default_factory=dict)


def soap_version_of(content_type: str) -> str:
    return "1.2" if content_type.split(";", 1)[0].strip().lower() == "application/soap+xml" else "1.1"


def _split(name: str) -> tuple[str, str]:
    ns, _, local = name.rpartition(" ")
    return ns, local


class _Reader:
    def __init__(self) -> None:
        self.depth = 0
        self.version: str | None = None
        self.operation: tuple[str, int] | None = None  # (namespace, depth)
        self.entries: dict[str, Any] = {}
        self._entry: dict[str, str] | None = None
        self._child: str | None = None
        self._text: list[str] = []

    def start(self, name: str, attrs: dict[str, str]) -> None:
        ns, local = _split(name)
        self.depth += 1
        if self.depth == 1:
            if local != "Envelope" or ns not in _ENVELOPES:
                raise SoapError("expected a SOAP Envelope (SOAP 1.1 or 1.2)")
            self.version = _ENVELOPES[ns]
        elif local == OPERATION and self.operation is None:
            self.operation = (ns, self.depth)
        elif local == "entry" and self.operation is not None:
            if "key" in attrs:
                self._add(attrs["key"], attrs.get("value", ""))
            else:
                self._entry = {}
        elif self._entry is not None and local in ("key", "value"):
            self._child, self._text = local, []

    def end(self, name: str) -> None:
        _, local = _split(name)
        if self._child is not None and local == self._child and self._entry is not None:
            self._entry[self._child] = "".join(self._text)
            self._child = None
        elif local == "entry" and self._entry is not None:
            entry, self._entry = self._entry, None
            if "key" not in entry:
                raise SoapError("an entry has no key")
            self._add(entry["key"], entry.get("value", ""))
        self.depth -= 1

    def text(self, data: str) -> None:
        if self._child is not None:
            self._text.append(data)

    def _add(self, key: str, value: str) -> None:
        key = key.strip()
        if key in self.entries:
            raise SoapError(f"the entry {key!r} is given twice")
        self.entries[key] = value.strip()


def _forbidden(*args: Any) -> int:  # typed as expat's handlers are; it never returns
    raise SoapError("document type declarations and entities are not accepted")


def parse_generate_map_token(body: bytes) -> SoapRequest:
    reader = _Reader()
    parser = expat.ParserCreate(namespace_separator=" ")
    parser.SetParamEntityParsing(expat.XML_PARAM_ENTITY_PARSING_NEVER)
    parser.StartDoctypeDeclHandler = _forbidden
    parser.EntityDeclHandler = _forbidden
    parser.UnparsedEntityDeclHandler = _forbidden
    parser.ExternalEntityRefHandler = _forbidden
    parser.StartElementHandler = reader.start
    parser.EndElementHandler = reader.end
    parser.CharacterDataHandler = reader.text
    try:
        parser.Parse(body, True)
    except expat.ExpatError as exc:
        raise SoapError(f"the XML is not well-formed ({expat.errors.messages.get(exc.code, 'error')})") from None
    if reader.version is None or reader.operation is None:
        raise SoapError(f"expected a {OPERATION} request in the SOAP Body")
    return SoapRequest(reader.version, reader.operation[0], reader.entries)


def _envelope(version: str, inner: str) -> str:
    return (f'<?xml version="1.0" encoding="UTF-8"?><soap:Envelope xmlns:soap={quoteattr(_NS_OF[version])}>'
            f"<soap:Body>{inner}</soap:Body></soap:Envelope>")


def generate_map_token_reply(request: SoapRequest, key: str) -> tuple[str, str]:
    """The response envelope holding the key, in the request's SOAP version and operation namespace."""
    element = f"ns:{OPERATION}Response" if request.operation_ns else f"{OPERATION}Response"
    declaration = f" xmlns:ns={quoteattr(request.operation_ns)}" if request.operation_ns else ""
    opening = f"<{element}{declaration}>"
    inner = f"{opening}<return>{escape(key)}</return></{element}>"
    return _envelope(request.version, inner), _CONTENT_TYPE[request.version]


def fault(version: str, status: int, description: str) -> tuple[str, str, int]:
    """A SOAP Fault: (text, content type, HTTP status). SOAP 1.1 §6.2 sends faults with 500 (authentication
    and availability keep 401 and 503); SOAP 1.2 Part 2 §7.5.2 maps Sender faults to 400."""
    sender = status < 500
    if version == "1.1":
        code = "soap:Client" if sender else "soap:Server"
        inner = (f"<soap:Fault><faultcode>{code}</faultcode><faultstring>{escape(description)}</faultstring>"
                 "</soap:Fault>")
        return _envelope(version, inner), _CONTENT_TYPE[version], 500 if status == 400 else status
    code = "soap:Sender" if sender else "soap:Receiver"
    inner = (f"<soap:Fault><soap:Code><soap:Value>{code}</soap:Value></soap:Code><soap:Reason>"
             f'<soap:Text xml:lang="en">{escape(description)}</soap:Text></soap:Reason></soap:Fault>')
    return _envelope(version, inner), _CONTENT_TYPE[version], status
