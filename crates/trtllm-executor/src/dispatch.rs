//! A thread that fans a stream out to subscribers and keeps a bounded history, so the engine
//! loop hands its stats and KV events over with one channel send and never waits on readers.

use std::collections::VecDeque;
use std::sync::{Arc, Mutex, MutexGuard};
use std::thread::JoinHandle;

use crossbeam_channel::{unbounded, Receiver, Sender};

pub(crate) struct Dispatcher<T> {
    input: Option<Sender<T>>,
    shared: Arc<Mutex<Shared<T>>>,
    thread: Option<JoinHandle<()>>,
}

struct Shared<T> {
    history: VecDeque<T>,
    cap: usize,
    subscribers: Vec<Sender<T>>,
}

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

impl<T: Clone + Send + 'static> Dispatcher<T> {
    pub fn spawn(name: &str, cap: usize) -> std::io::Result<Self> {
        let (input, rx) = unbounded::<T>();
        let shared = Arc::new(Mutex::new(Shared {
            history: VecDeque::new(),
            cap,
            subscribers: Vec::new(),
        }));
        let s = shared.clone();
        let thread = std::thread::Builder::new()
            .name(name.into())
            .spawn(move || {
                for item in rx {
                    let mut g = lock(&s);
                    g.subscribers.retain(|tx| tx.send(item.clone()).is_ok());
                    if g.cap > 0 {
                        if g.history.len() == g.cap {
                            g.history.pop_front();
                        }
                        g.history.push_back(item);
                    }
                }
            })?;
        Ok(Self {
            input: Some(input),
            shared,
            thread: Some(thread),
        })
    }

    pub fn sender(&self) -> Sender<T> {
        self.input.clone().expect("input lives until drop")
    }

    /// Everything kept since the last call, oldest first.
    pub fn drain(&self) -> Vec<T> {
        lock(&self.shared).history.drain(..).collect()
    }

    /// Every item from now on; the subscription ends when the receiver is dropped.
    pub fn subscribe(&self) -> Receiver<T> {
        let (tx, rx) = unbounded();
        lock(&self.shared).subscribers.push(tx);
        rx
    }
}

impl<T> Drop for Dispatcher<T> {
    fn drop(&mut self) {
        // The thread ends once every sender (ours and the engine loop's) is gone.
        self.input = None;
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fans_out_and_keeps_bounded_history() {
        let d = Dispatcher::<u32>::spawn("test", 3).unwrap();
        let sub = d.subscribe();
        let tx = d.sender();
        for i in 0..5 {
            tx.send(i).unwrap();
        }
        let got: Vec<u32> = (0..5).map(|_| sub.recv().unwrap()).collect();
        assert_eq!(got, [0, 1, 2, 3, 4]);
        assert_eq!(d.drain(), [2, 3, 4]);
        assert!(d.drain().is_empty());
    }
}
