"""Data files shipped inside the package (CLIP BPE vocabulary); see docs/third_party.md."""
