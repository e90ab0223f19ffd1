//! Docker volume driver (in progress).
