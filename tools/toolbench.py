def load_toolbench(path):
    raise NotImplementedError
