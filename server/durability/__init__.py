"""Sessions that outlive a server: the persistence policy that commits a batch's states (persistence.py), the
session stores it writes to (store/: memory, Redis), and snapshots a client carries (snapshot.py)."""
