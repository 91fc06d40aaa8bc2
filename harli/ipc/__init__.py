"""Everything that crosses a process boundary: message structs, codecs, endpoint addresses.

Depends on nothing else in harli, so every process role (and a client in another program) can
import it alone.
"""
