//! Block presence bitmap of a cached chunk, stored as little-endian bytes in the index.

/// One bit per block.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Bitmap {
    bits: Vec<u8>,
    len: u32,
}

impl Bitmap {
    pub fn new(len: u32) -> Self {
        Self {
            bits: vec![0; (len as usize).div_ceil(8)],
            len,
        }
    }

    /// From stored bytes; `None` if the size does not fit `len`.
    pub fn from_bytes(bytes: Vec<u8>, len: u32) -> Option<Self> {
        (bytes.len() == (len as usize).div_ceil(8)).then_some(Self { bits: bytes, len })
    }

    pub fn as_bytes(&self) -> &[u8] {
        &self.bits
    }

    pub fn len(&self) -> u32 {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn get(&self, i: u32) -> bool {
        i < self.len && self.bits[(i / 8) as usize] & (1 << (i % 8)) != 0
    }

    pub fn set(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] |= 1 << (i % 8);
        }
    }

    pub fn clear(&mut self, i: u32) {
        if i < self.len {
            self.bits[(i / 8) as usize] &= !(1 << (i % 8));
        }
    }

    /// Union with another bitmap of the same length.
    pub fn merge(&mut self, other: &Bitmap) {
        for (a, b) in self.bits.iter_mut().zip(&other.bits) {
            *a |= *b;
        }
    }

    pub fn count(&self) -> u32 {
        (0..self.len).filter(|&i| self.get(i)).count() as u32
    }

    pub fn all(&self, range: std::ops::Range<u32>) -> bool {
        range.into_iter().all(|i| self.get(i))
    }

    pub fn is_full(&self) -> bool {
        self.all(0..self.len)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn bits() {
        let mut b = Bitmap::new(11);
        assert_eq!(b.as_bytes().len(), 2);
        b.set(0);
        b.set(10);
        assert!(b.get(0) && b.get(10) && !b.get(5));
        assert_eq!(b.count(), 2);
        b.clear(0);
        assert_eq!(b.count(), 1);
        let mut c = Bitmap::new(11);
        c.set(3);
        b.merge(&c);
        assert!(b.get(3));
        assert!(Bitmap::from_bytes(vec![0; 3], 11).is_none());
    }
}
