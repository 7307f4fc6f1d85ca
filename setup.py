import os.path as osp
import shutil

from setuptools import find_packages, setup
from setuptools.command.build_py import build_py

HERE = osp.dirname(osp.abspath(__file__))
#: folders of the source tree shipped inside the package, in
#: ``mmseg_robust/.mim/`` as mmseg ships its own (``mmseg/.mim/configs``): the
#: evaluator presets (``evaluator=SEA``), the model configs and the tools.
MIM_FOLDERS = ('configs', 'tools')


def read_requirements(name):
    """Requirement lines of requirements/<name>.txt (comments dropped)."""
    with open(osp.join(HERE, 'requirements', name)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


def get_version():
    scope = {}
    with open(osp.join(HERE, 'mmseg_robust', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


class BuildPyWithConfigs(build_py):
    """``build_py`` that also copies configs/ and tools/ into the built package
    (``mmseg_robust/.mim/``), so that a wheel or a ``pip install .`` carries
    them. An editable install (``pip install -e .``) copies nothing: it reads
    them from the source tree (:func:`mmseg_robust.engine.presets.config_dir`).
    The copies live only in the build folder, never in the source tree."""

    def run(self):
        super().run()
        if getattr(self, 'editable_mode', False):
            return
        for name in MIM_FOLDERS:
            target = osp.join(self.build_lib, 'mmseg_robust', '.mim', name)
            if osp.isdir(target):
                shutil.rmtree(target)  # nothing stale from an earlier build
            shutil.copytree(
                osp.join(HERE, name),
                target,
                ignore=shutil.ignore_patterns('__pycache__', '*.pyc'),
            )


if __name__ == '__main__':
    setup(
        name='mmseg_robust',
        version=get_version(),
        description='Adversarial robustness evaluation (SEA) and adversarial '
        'training (PIR-AT, SAT, DDC-AT) for MMSegmentation 1.x',
        long_description=open(osp.join(HERE, 'README.md')).read(),
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'benchmarks')),
        package_data={'mmseg_robust': ['attacks/data/*.json']},
        include_package_data=True,
        cmdclass={'build_py': BuildPyWithConfigs},
        # tools/demo.py uses `int | None` annotations (Python 3.10)
        python_requires='>=3.10',
        classifiers=[
            'License :: OSI Approved :: Apache Software License',
            'Operating System :: OS Independent',
            'Programming Language :: Python :: 3',
            'Programming Language :: Python :: 3.11',  # the version CI tests
            'Topic :: Scientific/Engineering :: Artificial Intelligence',
        ],
        # torch, torchvision and mmcv (full, with ops) are prerequisites
        # installed first, as in every OpenMMLab project: see README.
        install_requires=read_requirements('runtime.txt'),
        extras_require=dict(
            tests=read_requirements('tests.txt'),
            corruptions=read_requirements('corruptions.txt'),
            **{'adv-lib': read_requirements('advlib.txt')},
        ),
        zip_safe=False,
    )
