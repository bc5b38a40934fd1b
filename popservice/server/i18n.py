"""
RFC 6856 LANG: the human-readable text of status lines in another language.

Response codes, numbers and the C{+OK}/C{-ERR} status never change; only the
free text after them is looked up in a catalog (English is the key), exactly
or by a pattern for texts that carry numbers.
"""

from __future__ import annotations

import re
from collections.abc import Callable
from typing import Union

from popservice import wire

Replacement = Union[str, Callable[["re.Match[str]"], str]]

#: Language tag -> (description, exact texts, patterns)
LANGUAGES: dict[str, str] = {"en": "English", "de": "Deutsch"}

_EXACT: dict[str, dict[str, str]] = {
    "de": {
        "POP3 server ready": "POP3-Server bereit",
        "Send your password": "Bitte Passwort senden",
        "Send USER first": "Zuerst USER senden",
        "Authentication failed": "Anmeldung fehlgeschlagen",
        "Authentication cancelled": "Anmeldung abgebrochen",
        "No such message": "Keine solche Nachricht",
        "Message already deleted": "Nachricht bereits gelöscht",
        "Bye": "Auf Wiedersehen",
        "Unknown command": "Unbekannter Befehl",
        "Command not valid in this state": "Befehl in diesem Zustand nicht erlaubt",
        "Already logged in": "Bereits angemeldet",
        "Capability list follows": "Liste der Fähigkeiten folgt",
        "Mechanisms follow": "Liste der Verfahren folgt",
        "Top of message follows": "Anfang der Nachricht folgt",
        "Command line too long": "Befehlszeile zu lang",
        "Missing argument": "Argument fehlt",
        "Too many arguments": "Zu viele Argumente",
        "Invalid number": "Ungültige Zahl",
        "Invalid argument syntax": "Ungültige Argumentsyntax",
        "Argument too long": "Argument zu lang",
        "Invalid characters in command": "Ungültige Zeichen im Befehl",
        "Invalid characters in argument": "Ungültige Zeichen im Argument",
        "Mailbox is locked by another session": "Postfach wird von einer anderen Sitzung benutzt",
        "Mailbox is unavailable": "Postfach ist nicht verfügbar",
        "Message is no longer available": "Nachricht ist nicht mehr verfügbar",
        "Internal server error": "Interner Serverfehler",
        "Some deleted messages were not removed": "Einige gelöschte Nachrichten wurden nicht entfernt",
        "Disconnected for inactivity": "Verbindung wegen Inaktivität getrennt",
        "Minimum time between logins not reached": "Mindestabstand zwischen Anmeldungen nicht erreicht",
        "Plaintext authentication disallowed on non-secure connections, use STLS":
            "Klartext-Anmeldung auf unverschlüsselten Verbindungen nicht erlaubt, bitte STLS benutzen",
        "Unsupported authentication mechanism": "Anmeldeverfahren nicht unterstützt",
        "TLS is not available": "TLS ist nicht verfügbar",
        "Already using TLS": "TLS ist bereits aktiv",
        "Begin TLS negotiation now": "TLS-Aushandlung beginnt",
        "UTF8 mode enabled": "UTF8-Modus aktiviert",
        "Language changed": "Sprache geändert",
        "Language listing follows": "Liste der Sprachen folgt",
        "Unknown language": "Unbekannte Sprache",
        "Too many invalid commands, closing connection":
            "Zu viele ungültige Befehle, Verbindung wird getrennt",
        "Too many failed logins, closing connection":
            "Zu viele fehlgeschlagene Anmeldungen, Verbindung wird getrennt",
    },
}

_PATTERNS: dict[str, list[tuple["re.Pattern[str]", str]]] = {
    "de": [
        (re.compile(r"Logged in, (\d+) messages\Z"), r"Angemeldet, \1 Nachrichten"),
        (re.compile(r"(\d+) octets\Z"), r"\1 Oktette"),
        (re.compile(r"Message (\d+) deleted\Z"), r"Nachricht \1 gelöscht"),
        (re.compile(r"(\d+) messages \((\d+) octets\)\Z"), r"\1 Nachrichten (\2 Oktette)"),
        (re.compile(r"Bye, (\d+) messages deleted\Z"), r"Auf Wiedersehen, \1 Nachrichten gelöscht"),
        (re.compile(r"POP3 server ready (<[^>]*>)\Z"), r"POP3-Server bereit \1"),
    ],
}

_STATUS = re.compile(rb"(\+OK|-ERR)( \[[^\]]*\])?( (.*))?\r\n", re.S)


def translate(text: str, language: str) -> str:
    """The text in C{language}; unchanged when there is no translation."""
    exact = _EXACT.get(language)
    if exact is None:
        return text
    found = exact.get(text)
    if found is not None:
        return found
    for pattern, replacement in _PATTERNS.get(language, ()):
        if pattern.match(text):
            return pattern.sub(replacement, text)
    return text


def localise(response: bytes, language: str) -> bytes:
    """Translate the text of the status line that starts C{response}."""
    if language == "en":
        return response
    end = response.find(b"\r\n")
    if end < 0:
        return response
    m = _STATUS.match(response[:end + 2])
    if m is None or m.group(4) is None:
        return response
    text = translate(m.group(4).decode("utf-8", "replace"), language)
    line = m.group(1) + (m.group(2) or b"") + b" " + text.encode("utf-8") + b"\r\n"
    return line + response[end + 2:]


def choose(tag: str) -> "str | None":
    """RFC 6856 section 4: a language tag (or C{*} for the default) -> a supported language."""
    if tag == "*":
        return "en"
    tag = tag.lower()
    if tag in LANGUAGES:
        return tag
    primary = tag.split("-", 1)[0]
    return primary if primary in LANGUAGES else None


def lang_response(argument: "str | None", current: str) -> "tuple[bytes, str]":
    """
    RFC 6856 section 4, LANG [tag]: the answer, and the session's language
    after it (C{current} unless a known language was chosen).
    """
    if argument is None:
        return (wire.multiline(wire.ok("Language listing follows"),
                               [("%s %s" % item).encode("utf-8") for item in LANGUAGES.items()]), current)
    language = choose(argument)
    if language is None:
        return wire.err("Unknown language"), current
    return wire.ok("%s %s" % (language, translate("Language changed", language))), language
