"""Training pairs built from medical volumes and radiographs with medsr.degrade."""
