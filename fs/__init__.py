"""The KV store (files over refcounted pages, copy-on-write fork, prefix index) and,
in a later issue, the pyfuse3 filesystem that shows it."""
