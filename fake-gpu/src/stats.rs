//! Device counters. The engine bumps them with relaxed atomics; the control
//! socket and the register page mirror read them without stopping the
//! engine.

use std::sync::atomic::{AtomicU64, Ordering};

use serde_json::{json, Map, Value};

use crate::layout::{OPCODES, STATUSES};

#[derive(Debug, Default)]
pub struct Counter(AtomicU64);

impl Counter {
    pub fn add(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }

    pub fn inc(&self) {
        self.add(1);
    }

    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

/// Slots in the per-opcode and per-status arrays (and in the register
/// page's mirrors of them).
pub const SLOTS: usize = 16;

#[derive(Debug, Default)]
pub struct Stats {
    /// Doorbell eventfd wake-ups (each may stand for several guest writes).
    pub doorbells: Counter,
    /// Ring scans started by the poll timer rather than a doorbell.
    pub polls: Counter,
    /// Commands completed, successfully or not.
    pub commands: Counter,
    /// Completions with a non-zero status (ring index errors included).
    pub errors: Counter,
    /// Bytes filled, copied or checksummed by successful commands.
    pub bytes: Counter,
    /// Interrupts raised on the guest (eventfd writes).
    pub interrupts: Counter,
    /// Interrupts that could not be raised: no guest connected.
    pub interrupts_dropped: Counter,
    /// Distinct bad `CMD_PROD` values seen.
    pub ring_errors: Counter,
    /// Times the engine stopped for lack of room in the completion ring.
    pub cpl_stalls: Counter,
    /// Ring resets (driver requests and guest connects).
    pub resets: Counter,
    pub guest_connects: Counter,
    pub guest_disconnects: Counter,
    /// Connections refused because a guest was already connected.
    pub guests_refused: Counter,
    pub by_opcode: [Counter; SLOTS],
    pub bytes_by_opcode: [Counter; SLOTS],
    pub by_status: [Counter; SLOTS],
}

impl Stats {
    /// Counts one completed command (`opcode` as found in the entry).
    pub fn command(&self, opcode: u16, status: u32, bytes: u64) {
        self.commands.inc();
        let op = usize::from(opcode).min(SLOTS - 1);
        self.by_opcode[op].inc();
        if status == 0 {
            self.bytes.add(bytes);
            self.bytes_by_opcode[op].add(bytes);
        } else {
            self.errors.inc();
        }
        let st = usize::try_from(status).unwrap_or(SLOTS - 1).min(SLOTS - 1);
        self.by_status[st].inc();
    }

    /// All counters as JSON; opcodes and statuses by name (unknown opcodes
    /// are counted under `other`).
    pub fn to_json(&self) -> Value {
        let mut by_op = Map::new();
        let mut bytes_op = Map::new();
        for op in OPCODES {
            by_op.insert(op.name().into(), self.by_opcode[op as usize].get().into());
            bytes_op.insert(
                op.name().into(),
                self.bytes_by_opcode[op as usize].get().into(),
            );
        }
        let other: u64 = (OPCODES.len()..SLOTS)
            .map(|i| self.by_opcode[i].get())
            .sum();
        by_op.insert("other".into(), other.into());
        let mut by_status = Map::new();
        for st in STATUSES {
            by_status.insert(st.name().into(), self.by_status[st as usize].get().into());
        }
        json!({
            "doorbells": self.doorbells.get(),
            "polls": self.polls.get(),
            "commands": self.commands.get(),
            "errors": self.errors.get(),
            "bytes": self.bytes.get(),
            "interrupts": self.interrupts.get(),
            "interrupts_dropped": self.interrupts_dropped.get(),
            "ring_errors": self.ring_errors.get(),
            "cpl_stalls": self.cpl_stalls.get(),
            "resets": self.resets.get(),
            "guest_connects": self.guest_connects.get(),
            "guest_disconnects": self.guest_disconnects.get(),
            "guests_refused": self.guests_refused.get(),
            "commands_by_opcode": by_op,
            "bytes_by_opcode": bytes_op,
            "completions_by_status": by_status,
        })
    }
}
