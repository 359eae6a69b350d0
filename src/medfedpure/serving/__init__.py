"""One hospital's defended classifier outside the run folder: export it as a bundle, ask it about
scans (`predict`), serve it over HTTP with a page (`serve`)."""
