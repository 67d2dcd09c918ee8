"""bac-node: breast arterial calcification (BAC) on screening mammograms, as a DICOM node.

Research use only. Not for clinical use.
"""

__version__ = "0.1.0"
