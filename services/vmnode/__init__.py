"""vmnode: the node agent of one worker host; it runs the workloads placed on it."""
