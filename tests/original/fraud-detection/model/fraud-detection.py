############################################################################
# The fraud-detection example's model.py in the original's shape (our own, smaller): a Keras dense
# network on card transactions read from DATA_DIR (CSV: 8 feature columns, then Class 0/1), the
# original's callback with positional syncFrequency and minPeers, string-typed numbers it casts, the
# final model saved under SCRATCH_DIR. As the mnist example here: `import keras` (Keras 3, on the torch
# backend: the profile's KERAS_BACKEND) where the original imported tensorflow.
############################################################################

import os

import keras
import numpy as np
from swarmlearning.tf import SwarmCallback

dataDir = os.getenv('DATA_DIR', './app-data')
scratchDir = os.getenv('SCRATCH_DIR', './scratch')
maxEpochs = int(os.getenv('MAX_EPOCHS', '5'))
minPeers = int(os.getenv('MIN_PEERS', '2'))
batchSize = 16


def loadData(path):
    table = np.loadtxt(path, delimiter=',', skiprows=1, dtype=np.float32)
    return table[:, :-1], table[:, -1]


def main():
    keras.utils.set_random_seed(7)
    xTrain, yTrain = loadData(os.path.join(dataDir, 'train.csv'))
    xTest, yTest = loadData(os.path.join(dataDir, 'test.csv'))

    model = keras.models.Sequential([
        keras.Input(shape=(xTrain.shape[1],)),
        keras.layers.Dense(12, activation='relu'),
        keras.layers.Dense(1, activation='sigmoid'),
    ])
    model.compile(loss='binary_crossentropy', optimizer='adam', metrics=['accuracy'])

    swarmCallback = SwarmCallback('4', str(minPeers), mergeMethod='MEAN', totalEpochs=maxEpochs,
                                  adsValData=(xTest, yTest), adsValBatchSize='16')
    model.fit(xTrain, yTrain, batch_size=batchSize, epochs=maxEpochs, verbose=2, shuffle=False,
              callbacks=[swarmCallback])

    os.makedirs(scratchDir, exist_ok=True)
    modelPath = os.path.join(scratchDir, 'fraud-detection.keras')
    model.save(modelPath)
    swarmCallback.logger.info(f'Saved the trained model - {modelPath}')


if __name__ == '__main__':
    main()
