"""The DICOM node: SCP, store, queue, scheduler, worker and export."""
