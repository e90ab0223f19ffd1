//! FUSE adapter (in progress).
