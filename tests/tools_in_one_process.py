"""Run stock tools one after the other in one interpreter (the tests' launcher).

    python tests/tools_in_one_process.py tools/train.py ARGS ... \\
        ::: tools/test.py ARGS ...

Each group runs as ``python TOOL ARGS`` would (``runpy`` with ``__main__``), then
mmengine's singletons (loggers, message hub, visualizer, default scope) are reset,
as mmengine's ``RunnerTestCase`` does between Runners. The end-to-end tests use it
to pay the ~8 s import of torch/mmseg once per case instead of once per tool.
"""

import runpy
import sys


def reset_singletons() -> None:
    """Clear mmengine's singletons, as its ``RunnerTestCase.tearDown`` does between
    Runners (the tests' ``reset_mmengine`` fixture calls this too).

    ``RunnerTestCase`` itself does not fit the tests: it is a ``unittest.TestCase``
    (no pytest fixtures or parametrize) whose ``setUp`` registers toy models and
    datasets the tests do not use, and its ``logging.shutdown()`` would close every
    handler of the process, pytest's own too. Here only the loggers' own handlers
    are closed (their log files), then the instances dropped.
    """
    from mmengine.logging import MessageHub, MMLogger
    from mmengine.registry import DefaultScope
    from mmengine.visualization import Visualizer

    for logger in list(MMLogger._instance_dict.values()):
        for handler in list(logger.handlers):
            logger.removeHandler(handler)
            handler.close()
    for cls in (MMLogger, MessageHub, Visualizer, DefaultScope):
        cls._instance_dict.clear()


def main(argv) -> None:
    groups, current = [], []
    for arg in argv:
        if arg == ':::':
            groups.append(current)
            current = []
        else:
            current.append(arg)
    groups.append(current)
    for group in groups:
        if not group:
            raise SystemExit('empty tool invocation')
        print(f'=== {" ".join(group)}', flush=True)
        sys.argv = list(group)
        runpy.run_path(group[0], run_name='__main__')
        reset_singletons()


if __name__ == '__main__':
    main(sys.argv[1:])
