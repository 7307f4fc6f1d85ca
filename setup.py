import os.path as osp

from setuptools import find_packages, setup


def read_requirements(name):
    """Requirement lines of requirements/<name>.txt (comments dropped)."""
    with open(osp.join('requirements', name)) as f:
        lines = (line.split('#')[0].strip() for line in f)
        return [line for line in lines if line]


def get_version():
    scope = {}
    with open(osp.join('mmseg_robust', 'version.py')) as f:
        exec(f.read(), scope)
    return scope['__version__']


if __name__ == '__main__':
    setup(
        name='mmseg_robust',
        version=get_version(),
        description='Adversarial robustness evaluation (SEA) and adversarial '
        'training (PIR-AT, SAT, DDC-AT) for MMSegmentation 1.x',
        long_description=open('README.md').read(),
        long_description_content_type='text/markdown',
        license='Apache License 2.0',
        packages=find_packages(exclude=('configs', 'tools', 'tests', 'benchmarks')),
        package_data={'mmseg_robust': ['attacks/data/*.json']},
        include_package_data=True,
        python_requires='>=3.8',
        # torch, torchvision and mmcv (full, with ops) are prerequisites
        # installed first, as in every OpenMMLab project: see README.
        install_requires=read_requirements('runtime.txt'),
        extras_require=dict(tests=read_requirements('tests.txt')),
        zip_safe=False,
    )
