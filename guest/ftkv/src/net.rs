//! The virtio-net card as a smoltcp `Device`, without blocking and without
//! exits of its own.
//!
//! There are no interrupts: the VMM services both queues at every exit. So
//! receive buffers stay posted in the RX queue (filled at the next exit),
//! transmitted frames are only queued here and leave at the next exit, and
//! completions are collected with [`NetDevice::reclaim`] after an exit. The
//! main loop makes that exit (`nop()` or WAIT) once per iteration, for the
//! whole batch. virtio-drivers' blocking `send`/`receive_wait` spin on the
//! used ring without exiting and would hang here; they are never called.

use alloc::boxed::Box;
use alloc::vec;
use alloc::vec::Vec;
use core::cell::RefCell;

use smoltcp::phy::{self, DeviceCapabilities, Medium};
use smoltcp::time::Instant;
use virtio_drivers::device::net::VirtIONetRaw;
use virtio_drivers::transport::mmio::MmioTransport;

use crate::hal::PlatformHal;

/// Descriptors per queue (the device offers 256). Every RX and TX chain is
/// one descriptor (virtio header and frame in one buffer).
pub const QUEUE_SIZE: usize = 256;
/// One buffer: 12-byte `virtio_net_hdr_v1` + a 1514-byte Ethernet frame, rounded up.
const BUF_LEN: usize = 2048;
/// Ethernet MTU as smoltcp counts it (the frame without FCS).
const MTU: usize = 1514;

type Raw = VirtIONetRaw<PlatformHal, MmioTransport<'static>, QUEUE_SIZE>;

struct Inner {
    raw: Raw,
    /// RX buffers the device holds, by token (descriptor index).
    rx_posted: Vec<Option<Box<[u8]>>>,
    /// TX buffers free for the next frame.
    tx_free: Vec<Box<[u8]>>,
    /// TX buffers the device holds, by token, with the length handed over.
    tx_inflight: Vec<Option<(Box<[u8]>, usize)>>,
    /// Frames queued since the last [`NetDevice::take_queued`].
    tx_queued: usize,
    tx_frames: u64,
    tx_dropped: u64,
    rx_frames: u64,
}

pub struct NetDevice {
    inner: RefCell<Inner>,
    /// RX buffers whose frame smoltcp consumed, to be posted again.
    recycled: RefCell<Vec<Box<[u8]>>>,
    mac: [u8; 6],
}

impl NetDevice {
    pub fn new(transport: MmioTransport<'static>) -> Result<NetDevice, virtio_drivers::Error> {
        let raw = Raw::new(transport)?;
        let mac = raw.mac_address();
        let mut inner = Inner {
            raw,
            rx_posted: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_free: (0..QUEUE_SIZE)
                .map(|_| vec![0u8; BUF_LEN].into_boxed_slice())
                .collect(),
            tx_inflight: (0..QUEUE_SIZE).map(|_| None).collect(),
            tx_queued: 0,
            tx_frames: 0,
            tx_dropped: 0,
            rx_frames: 0,
        };
        for _ in 0..QUEUE_SIZE {
            inner.post_rx(vec![0u8; BUF_LEN].into_boxed_slice())?;
        }
        Ok(NetDevice {
            inner: RefCell::new(inner),
            recycled: RefCell::new(Vec::with_capacity(QUEUE_SIZE)),
            mac,
        })
    }

    pub fn mac(&self) -> [u8; 6] {
        self.mac
    }

    /// After an exit: takes back the TX buffers the device is done with and
    /// posts consumed RX buffers again. No exit.
    pub fn reclaim(&mut self) {
        let inner = self.inner.get_mut();
        while let Some(token) = inner.raw.poll_transmit() {
            let Some((buf, len)) = inner
                .tx_inflight
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                panic!("virtio-net: TX completion for unknown token {token}");
            };
            // SAFETY: `buf[..len]` is exactly the slice given to
            // `transmit_begin` for this token; it was not touched since.
            if let Err(e) = unsafe { inner.raw.transmit_complete(token, &buf[..len]) } {
                panic!("virtio-net: TX completion failed: {e:?}");
            }
            inner.tx_free.push(buf);
        }
        for buf in self.recycled.get_mut().drain(..) {
            if let Err(e) = inner.post_rx(buf) {
                panic!("virtio-net: reposting an RX buffer failed: {e:?}");
            }
        }
    }

    /// Frames queued for transmission since the last call: if nonzero, an
    /// exit is needed for them to leave.
    pub fn take_queued(&mut self) -> usize {
        core::mem::take(&mut self.inner.get_mut().tx_queued)
    }

    /// Frames handed to smoltcp so far.
    pub fn rx_frames(&self) -> u64 {
        self.inner.borrow().rx_frames
    }

    /// True if a received frame waits in the used ring.
    pub fn rx_pending(&self) -> bool {
        self.inner.borrow().raw.poll_receive().is_some()
    }
}

impl Inner {
    fn post_rx(&mut self, mut buf: Box<[u8]>) -> Result<(), virtio_drivers::Error> {
        // SAFETY: the buffer is kept in `rx_posted` and not accessed until
        // the device returns it (`receive_complete` in `receive`); moving the
        // Box does not move the heap memory the device writes.
        let token = unsafe { self.raw.receive_begin(&mut buf) }?;
        self.rx_posted[usize::from(token)] = Some(buf);
        Ok(())
    }
}

pub struct RxTok<'a> {
    buf: Box<[u8]>,
    start: usize,
    len: usize,
    recycle: &'a RefCell<Vec<Box<[u8]>>>,
}

impl phy::RxToken for RxTok<'_> {
    fn consume<R, F>(self, f: F) -> R
    where
        F: FnOnce(&[u8]) -> R,
    {
        let r = f(&self.buf[self.start..self.start + self.len]);
        self.recycle.borrow_mut().push(self.buf);
        r
    }
}

pub struct TxTok<'a> {
    inner: &'a RefCell<Inner>,
}

impl phy::TxToken for TxTok<'_> {
    fn consume<R, F>(self, len: usize, f: F) -> R
    where
        F: FnOnce(&mut [u8]) -> R,
    {
        let mut inner = self.inner.borrow_mut();
        let inner = &mut *inner;
        let Some(mut buf) = inner.tx_free.pop() else {
            // `transmit`/`receive` hand out tokens only with a free buffer,
            // so this is not reached; if it were, the frame is lost and TCP
            // retransmits it.
            inner.tx_dropped += 1;
            return f(&mut vec![0u8; len]);
        };
        let hdr = match inner.raw.fill_buffer_header(&mut buf) {
            Ok(h) if h + len <= buf.len() => h,
            _ => {
                inner.tx_free.push(buf);
                inner.tx_dropped += 1;
                return f(&mut vec![0u8; len]);
            }
        };
        let r = f(&mut buf[hdr..hdr + len]);
        let total = hdr + len;
        // SAFETY: the buffer moves into `tx_inflight` and is not accessed
        // until `reclaim` completes this token with the same slice.
        match unsafe { inner.raw.transmit_begin(&buf[..total]) } {
            Ok(token) => {
                inner.tx_inflight[usize::from(token)] = Some((buf, total));
                inner.tx_queued += 1;
                inner.tx_frames += 1;
            }
            Err(_) => {
                inner.tx_free.push(buf);
                inner.tx_dropped += 1;
            }
        }
        r
    }
}

impl phy::Device for NetDevice {
    type RxToken<'a> = RxTok<'a>;
    type TxToken<'a> = TxTok<'a>;

    fn receive(&mut self, _timestamp: Instant) -> Option<(RxTok<'_>, TxTok<'_>)> {
        let inner = self.inner.get_mut();
        // Receiving may need a reply (ACK, ARP): only with a TX buffer free.
        // Otherwise the frame waits in the used ring until the next exit
        // returned TX buffers.
        if inner.tx_free.is_empty() || !inner.raw.can_send() {
            return None;
        }
        let (buf, hdr, len) = loop {
            let token = inner.raw.poll_receive()?;
            let Some(mut buf) = inner
                .rx_posted
                .get_mut(usize::from(token))
                .and_then(Option::take)
            else {
                panic!("virtio-net: RX completion for unknown token {token}");
            };
            // SAFETY: `buf` is the whole buffer posted with this token.
            match unsafe { inner.raw.receive_complete(token, &mut buf) } {
                Ok((hdr, len)) => break (buf, hdr, len),
                // Used with length 0: the device dropped a frame too big for
                // the buffer. The descriptor is back; post the buffer again.
                Err(virtio_drivers::Error::IoError) => {
                    self.recycled.get_mut().push(buf);
                }
                Err(e) => panic!("virtio-net: RX completion failed: {e:?}"),
            }
        };
        inner.rx_frames += 1;
        let start = hdr.min(buf.len());
        let len = len.min(buf.len() - start);
        Some((
            RxTok {
                buf,
                start,
                len,
                recycle: &self.recycled,
            },
            TxTok { inner: &self.inner },
        ))
    }

    fn transmit(&mut self, _timestamp: Instant) -> Option<TxTok<'_>> {
        let inner = self.inner.get_mut();
        if inner.tx_free.is_empty() || !inner.raw.can_send() {
            return None;
        }
        Some(TxTok { inner: &self.inner })
    }

    fn capabilities(&self) -> DeviceCapabilities {
        let mut caps = DeviceCapabilities::default();
        caps.medium = Medium::Ethernet;
        caps.max_transmission_unit = MTU;
        // smoltcp checks and fills every checksum (defaults).
        caps
    }
}
