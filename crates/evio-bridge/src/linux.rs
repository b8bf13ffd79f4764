//! Linux bridge backend (netlink). Placeholder until the CNI plugin work fills it in.
