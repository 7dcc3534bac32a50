//! The x86-TSO conformance kit: litmus tests, an exhaustive reference model of x86-TSO, a code
//! generator for native and vsmp guest runs, and a runner that judges observed final states.
//!
//! The model is deliberately independent of everything it judges: it shares no code with the
//! monitor, the DSM or the fabric.
