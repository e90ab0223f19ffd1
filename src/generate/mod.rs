//! `horcrux generate`: cut a directory tree into chunks and a manifest, and record the first
//! commit of a volume. (Implementation in progress.)
