"""The virtual block device: one handler with the disk's semantics, and its transports.

`handler.BlockHandler` holds the block semantics of an image (a `LayerStack`) for every
transport: read, write, unmap (zeroed mappings in the writable layer), write-same, synchronize
cache (the writable layer fsynced), capacity, and byte-level reads and writes of any alignment
(read-modify-write of partial sectors, under a per-sector-range lock). `scsi.execute` decodes
a SCSI command descriptor block into handler calls and answers with status, data-in and
fixed-format sense data, as a SCSI target does (SBC-3, SPC-4).

A TCMU transport
    These kernels lack target_core_user, so there is no TCMU transport here; on a kernel that
    has it, one is a thin loop around `scsi.execute`:

    1. configure a user-backed device in configfs (``/sys/kernel/config/target/core/user_N/
       NAME``: ``dev_config`` naming the handler, ``dev_size`` = `BlockHandler.size`,
       ``hw_block_size`` = its block size, ``enable``) and export it through a fabric
       (loopback for a local /dev/sdX, or iSCSI);
    2. open the matching ``/dev/uioN``, read the mailbox size from
       ``/sys/class/uio/uioN/maps/map0/size`` and mmap it: a `tcmu_mailbox` header and the
       command ring, followed by the data area the iovecs point into;
    3. loop: block on a 4-byte ``read`` of the uio fd (the kernel's doorbell), walk the ring
       from ``cmd_tail`` to ``cmd_head``; for each TCMU_OP_CMD entry gather the CDB (at
       ``cdb_off`` in the mapping) and the data-out iovecs, call ``execute(handler, cdb,
       data_out)``, scatter `data_in` into the data-in iovecs, copy `sense` (up to 96 bytes)
       and the status into the entry, skip TCMU_OP_PAD entries; advance ``cmd_tail`` and
       ``write`` 4 bytes to the fd to tell the kernel;
    4. for concurrency, hand entries to a thread pool (the handler is thread-safe) and
       complete them out of order; the ring's entries carry their own ids.

    Everything the kernel's SCSI layer can send it asks through `execute`; the transport
    adds no block semantics of its own. The FUSE transport (issue 4) calls the handler's
    byte-level methods directly.
"""
