"""
A Maildir mail store: L{MaildirStore} (L{IMailStore}) and L{MaildirMailbox}
(L{IMailbox}).

Layout and rules (see also /work/shared/pop3-notes.md, "Maildir"):

 - A message is a file in C{new/} or C{cur/}; its I{base name} (key) is the
   file name up to the first C{:} (the C{:2,FLAGS} info part excluded), which
   other programs never change when they flag or move a message.
 - At login, C{new/X} is renamed C{cur/X:2,} (as Dovecot does), then messages
   are numbered oldest first by the integer time stamp that starts the base
   name (ties and non-numeric names by base name).  The listing is frozen for
   the session.
 - UIDLs and sizes live in a small index file in the Maildir,
   C{popservice-uidlist}, replaced atomically.  A UIDL is assigned once, at
   first sight, from a monotonic counter, and never changes or comes back.
 - Without an index, UIDLs are taken over from C{dovecot-uidlist} or
   C{courierpop3dsizelist} when present, so clients do not download everything
   again after a migration.

Filesystem work (directory scan, size computation, unlinking) runs in the
reactor's thread pool, except a warm login: a Maildir unchanged since its
last listing (four stat calls tell) is locked and listed on the reactor
thread.  Reading an open message file is done synchronously in 64 KiB
chunks (local reads are fast).

Where each part lives (a module imports only the ones above it):

 - L{order}: message numbering, oldest first by delivery time stamp.
 - L{layout}: the Maildir on disk: cur/new/tmp, base names, listing the
   directories, moving new/ to cur/, creating a Maildir.
 - L{sizes}: transmitted sizes, from C{,W=} or computed once.
 - L{uidlist}: our index C{popservice-uidlist}: format, parsing, UIDL
   assignment, atomic writes and the lock around them.
 - L{importers}: taking UIDLs over from C{dovecot-uidlist} (and Dovecot's
   C{pop3_uidl_format}) or C{courierpop3dsizelist}.
 - L{listing}: L{Listing}, a compact session listing, shared between sessions.
 - L{freshness}: has the Maildir changed since a listing was made (a few stat calls)?
 - L{cache}: the listings kept between logins (a store's warm listings, the
   per-process cache of big Maildirs).
 - L{scan}: L{scan_maildir}, the session listing, made from all of the above.
 - L{mailbox}: L{MaildirMailbox}: reading, deleting (UPDATE), EXPIRE hooks.
 - L{store}: L{MaildirStore}: path templates, user-name check, session lock.
 - L{delivery}: new mail into C{tmp/} then C{new/} (L{IMailDelivery}, provided
   by L{MaildirStore}), with the idempotency record C{popservice-delivered}.

This package re-exports what other code uses; a test that replaces a name
replaces it in the submodule that looks it up.
"""

from __future__ import annotations

from popservice.stores.maildir.cache import LISTING_CACHE_MESSAGES as LISTING_CACHE_MESSAGES
from popservice.stores.maildir.cache import LISTING_CACHE_MINIMUM as LISTING_CACHE_MINIMUM
from popservice.stores.maildir.cache import _clear_index_cache as _clear_index_cache
from popservice.stores.maildir.cache import _listing_cache as _listing_cache
from popservice.stores.maildir.cache import _ListingCache as _ListingCache
from popservice.stores.maildir.importers import COURIER_SIZELIST as COURIER_SIZELIST
from popservice.stores.maildir.importers import DEFAULT_DOVECOT_UIDL_FORMAT as DEFAULT_DOVECOT_UIDL_FORMAT
from popservice.stores.maildir.importers import DOVECOT_UIDLIST as DOVECOT_UIDLIST
from popservice.stores.maildir.importers import DovecotUIDLFormat as DovecotUIDLFormat
from popservice.stores.maildir.importers import parse_courier_sizelist as parse_courier_sizelist
from popservice.stores.maildir.importers import parse_dovecot_uidlist as parse_dovecot_uidlist
from popservice.stores.maildir.layout import base_name as base_name
from popservice.stores.maildir.layout import ensure_maildir as ensure_maildir
from popservice.stores.maildir.mailbox import MaildirMailbox as MaildirMailbox
from popservice.stores.maildir.mailbox import MaildirMessageStream as MaildirMessageStream
from popservice.stores.maildir.order import _plain_order as _plain_order
from popservice.stores.maildir.order import _sorted_bases as _sorted_bases
from popservice.stores.maildir.order import message_sort_key as message_sort_key
from popservice.stores.maildir.scan import scan_maildir as scan_maildir
from popservice.stores.maildir.sizes import CHUNK_SIZE as CHUNK_SIZE
from popservice.stores.maildir.sizes import compute_size as compute_size
from popservice.stores.maildir.store import MaildirStore as MaildirStore
from popservice.stores.maildir.store import valid_user_name as valid_user_name
from popservice.stores.maildir.uidlist import INDEX_FILE_NAME as INDEX_FILE_NAME
from popservice.stores.maildir.uidlist import INDEX_LOCK_NAME as INDEX_LOCK_NAME
from popservice.stores.maildir.uidlist import _fresh_uidvalidity as _fresh_uidvalidity
from popservice.stores.maildir.uidlist import _Index as _Index
from popservice.stores.maildir.uidlist import _index_lock as _index_lock
from popservice.stores.maildir.uidlist import _parse_index_lines_fast as _parse_index_lines_fast
from popservice.stores.maildir.uidlist import _read_text as _read_text
from popservice.stores.maildir.uidlist import _write_index as _write_index
from popservice.stores.maildir.uidlist import parse_index as parse_index

__all__ = [
    "CHUNK_SIZE",
    "DEFAULT_DOVECOT_UIDL_FORMAT",
    "INDEX_FILE_NAME",
    "MaildirMailbox",
    "MaildirMessageStream",
    "MaildirStore",
    "base_name",
    "message_sort_key",
    "valid_user_name",
]
