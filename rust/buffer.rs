//! Page-aligned I/O buffers, allocated once and reused.
//!
//! Copies between the page cache and a buffer are several times slower when the
//! two are misaligned modulo 4096, and touching fresh pages is costly, so the
//! engine writes only from page-aligned buffers kept in a process-wide pool.

use std::alloc::{self, Layout};
use std::io::{self, Read};
use std::ptr::NonNull;
use std::sync::Mutex;

pub const BLOCK_SIZE: usize = 1 << 20;
const ALIGN: usize = 4096;
/// How many idle blocks the process keeps for the next download.
const POOL_LIMIT: usize = 64;

/// A `BLOCK_SIZE` buffer aligned to a page, with a fill length.
pub struct Block {
    ptr: NonNull<u8>,
    len: usize,
}

// The buffer is uniquely owned; moving it between threads is sound.
unsafe impl Send for Block {}

impl Block {
    fn layout() -> Layout {
        Layout::from_size_align(BLOCK_SIZE, ALIGN).expect("valid layout")
    }

    fn allocate() -> Self {
        let layout = Self::layout();
        // Zeroed (fresh mmap'd pages, no extra cost) so every byte is initialised
        // and `read_from` may hand the free space to `Read::read`.
        // SAFETY: the layout has a non-zero size.
        let raw = unsafe { alloc::alloc_zeroed(layout) };
        let ptr = NonNull::new(raw).unwrap_or_else(|| alloc::handle_alloc_error(layout));
        Self { ptr, len: 0 }
    }

    /// A block from the pool, or a new one.
    pub fn take() -> Self {
        let pooled = POOL.lock().map(|mut pool| pool.pop()).unwrap_or(None);
        let mut block = pooled.unwrap_or_else(Self::allocate);
        block.len = 0;
        block
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    pub fn is_full(&self) -> bool {
        self.len == BLOCK_SIZE
    }

    pub fn clear(&mut self) {
        self.len = 0;
    }

    /// Appends as much of `data` as fits; returns how many bytes were taken.
    pub fn fill_from(&mut self, data: &[u8]) -> usize {
        let n = data.len().min(BLOCK_SIZE - self.len);
        // SAFETY: `len + n <= BLOCK_SIZE`, the regions cannot overlap (we own ours).
        unsafe {
            std::ptr::copy_nonoverlapping(data.as_ptr(), self.ptr.as_ptr().add(self.len), n);
        }
        self.len += n;
        n
    }

    /// Reads from `reader` into the free space, at most `limit` bytes; returns how
    /// many were read (0 at end of input or when the block is full).
    pub fn read_from(&mut self, reader: &mut impl Read, limit: usize) -> io::Result<usize> {
        let n = limit.min(BLOCK_SIZE - self.len);
        // SAFETY: `len + n <= BLOCK_SIZE`, and the block was zeroed when allocated.
        let spare = unsafe { std::slice::from_raw_parts_mut(self.ptr.as_ptr().add(self.len), n) };
        let read = reader.read(spare)?;
        self.len += read;
        Ok(read)
    }

    /// The filled part.
    pub fn as_slice(&self) -> &[u8] {
        // SAFETY: the first `len` bytes were written by `fill_from`.
        unsafe { std::slice::from_raw_parts(self.ptr.as_ptr(), self.len) }
    }
}

impl Drop for Block {
    fn drop(&mut self) {
        // SAFETY: allocated in `allocate` with the same layout.
        unsafe { alloc::dealloc(self.ptr.as_ptr(), Self::layout()) }
    }
}

static POOL: Mutex<Vec<Block>> = Mutex::new(Vec::new());

/// Returns a block to the process-wide pool (or frees it when the pool is full).
pub fn recycle(block: Block) {
    if let Ok(mut pool) = POOL.lock() {
        if pool.len() < POOL_LIMIT {
            pool.push(block);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn blocks_are_aligned_and_fill_up() {
        let mut block = Block::take();
        assert_eq!(block.as_slice().as_ptr() as usize % ALIGN, 0);
        let data = vec![7u8; BLOCK_SIZE - 10];
        assert_eq!(block.fill_from(&data), BLOCK_SIZE - 10);
        assert_eq!(block.fill_from(&[1u8; 100]), 10);
        assert!(block.is_full());
        assert_eq!(block.as_slice()[BLOCK_SIZE - 1], 1);
        recycle(block);
        assert!(Block::take().is_empty());
    }
}
